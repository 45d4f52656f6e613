"""Two-process CPU (gloo) training step under DDP or FSDP2, compiled with backend="pamm".

Run as ``python tests/dist_worker.py {ddp,fsdp2} OUT_DIR``: every rank saves its
gradients (full tensors) to OUT_DIR/grads_<rank>.pt. Used by tests/test_distributed.py.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pamm_fx.demo.llama import Llama, LlamaConfig
from pamm_fx.testing import capture_rewrites

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
OPTIONS = {"ratio": 1, "min_tokens": 1}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch; rank r trains on row r."""
    tokens = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(5))
    return tokens[:, :-1], tokens[:, 1:]


def model() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG)


def run(rank: int, kind: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    net = model()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Tiny buckets make DDPOptimizer split the graph inside layers (its first-bucket cap must not exceed them).
        torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 8192
        wrapped = DDP(net, bucket_cap_mb=8192 / 2**20)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in net.layers:
            fully_shard(layer)
        wrapped = fully_shard(net)
    tokens, targets = batch()
    with capture_rewrites() as records:
        loss = torch.compile(wrapped, backend="pamm", options=OPTIONS)(tokens[rank : rank + 1], targets[rank : rank + 1])
    loss.backward()
    grads = {}
    for name, p in net.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    rewritten = sum(r.summary.count("linear_group(") for r in records if r.rewritten is not None)
    if os.environ.get("PAMM_DIST_DEBUG"):
        print("\n".join(r.summary for r in records))
    torch.save({"grads": grads, "graphs": len(records), "groups": rewritten}, f"{out_dir}/grads_{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2, join=True)
