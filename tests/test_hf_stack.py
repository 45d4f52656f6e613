"""Hugging Face training stack: peft LoRA adapters and the Trainer with torch_compile_backend="pamm"."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[test]'")
peft = pytest.importorskip("peft", reason="needs peft: pip install -e '.[test]'")

from pamm_fx.testing import capture_rewrites  # noqa: E402


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    lora = peft.get_peft_model(model, cfg)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make every A gradient zero
            torch.nn.init.normal_(p, std=0.02)
    return lora


def _adapter_grads(backend: str, options: dict | None) -> tuple[dict[str, torch.Tensor], list]:
    torch._dynamo.reset()
    model = _lora(_llama())
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with capture_rewrites() as records:
        loss = torch.compile(model, backend=backend, options=options)(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    return grads, records


def test_peft_lora_adapters_are_the_group_and_exact_at_ratio_one():
    expected, _ = _adapter_grads("inductor", None)
    got, records = _adapter_grads("pamm", {"ratio": 1, "min_tokens": 1, "min_generators": 16})
    summary = "\n".join(r.summary for r in records)
    # The trainable lora_A matrices read X; the frozen base projections are left alone.
    assert "q_proj.lora_A.default.weight" in summary and "k_proj.lora_A.default.weight" in summary
    assert "q_proj.base_layer.weight: frozen weight" in summary
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-3))


def test_trainer_with_a_pamm_compiled_model_trains(tmp_path):
    tokens = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", remove_unused_columns=False,
    )
    model = torch.compile(_llama(), backend="pamm", options={"ratio": 1 / 8, "min_tokens": 1, "min_generators": 16})
    with capture_rewrites() as records:
        result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(r.rewritten is not None and "q_proj.weight" in r.summary for r in records)


def test_trainer_torch_compile_backend_pamm_is_refused_by_accelerate(tmp_path):
    """accelerate validates torch_compile_backend against its own enum; pass a compiled model instead."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[], torch_compile=True,
        torch_compile_backend="pamm",
    )
    with pytest.raises(ValueError, match="is not a valid DynamoBackend"):
        transformers.Trainer(model=_llama(), args=args, train_dataset=[])
