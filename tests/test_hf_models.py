"""Hugging Face ``transformers`` models built from tiny configs (no downloads): what the backend
rewrites in each (golden text) and, for the layouts our own models do not have (GPT-2's
``Conv1D``, BART's cross-attention), exactness at ratio 1 against plain ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
from expecttest import TestCase

from pamm_fx.demo.measure import saved_for_backward
from pamm_fx.testing import capture_rewrites, describe_rewrites

transformers = pytest.importorskip("transformers")

OPTIONS = {"ratio": 1 / 4, "min_tokens": 1, "min_generators": 1}
VOCAB, DIM, SEQ = 64, 32, 12
SMALL = {"vocab_size": VOCAB, "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32}
NO_DROPOUT = {"attention_dropout": 0.0, "dropout": 0.0, "activation_dropout": 0.0}


def decoder_only(name: str) -> torch.nn.Module:
    """Llama, Qwen2 (q/k/v bias) and Mistral, GQA 4/2."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[name]
    return model_cls(config_cls(hidden_size=DIM, intermediate_size=64, num_key_value_heads=2, **SMALL))


def gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=DIM, n_layer=1, n_head=4, n_positions=32,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def encoder(name: str) -> torch.nn.Module:
    config_cls, model_cls = {
        "bert": (transformers.BertConfig, transformers.BertForMaskedLM),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForMaskedLM),
    }[name]
    return model_cls(config_cls(hidden_size=DIM, intermediate_size=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, **SMALL))


def bart() -> torch.nn.Module:
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=DIM, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32, **NO_DROPOUT)
    return transformers.BartForConditionalGeneration(cfg)


def t5() -> torch.nn.Module:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=DIM, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def logits_of(model: torch.nn.Module, seq2seq: bool = False):  # noqa: ANN201
    """The model as a function of token ids returning logits (the HF loss path adds graph breaks)."""
    if seq2seq:
        return lambda ids, dec: model(input_ids=ids, decoder_input_ids=dec).logits
    return lambda ids: model(input_ids=ids).logits


def ids(seq: int = SEQ, batch: int = 2) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))


def plan(model: torch.nn.Module, *inputs: torch.Tensor, seq2seq: bool = False) -> str:
    torch.manual_seed(0)
    return describe_rewrites(logits_of(model.train(), seq2seq), *inputs, **OPTIONS)


class TestHuggingFaceGoldens(TestCase):
    def test_llama(self) -> None:
        self.assertExpectedInline(plan(decoder_only("llama"), ids()), """\
compress(hidden_states_2: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(hidden_states_2: f32[2, 12, 32])
  model.layers.0.self_attn.q_proj.weight -> f32[2, 12, 32] -> view
  model.layers.0.self_attn.k_proj.weight -> f32[2, 12, 16] -> view_1
  model.layers.0.self_attn.v_proj.weight -> f32[2, 12, 16] -> view_2
untouched model.layers.0.self_attn.o_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.gate_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.up_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.down_proj.weight: output does not feed attention (targets='qkv')
untouched lm_head.weight: output does not feed attention (targets='qkv')""")

    def test_qwen2_gqa_qkv_bias(self) -> None:
        self.assertExpectedInline(plan(decoder_only("qwen2"), ids()), """\
compress(hidden_states_2: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(hidden_states_2: f32[2, 12, 32])
  model.layers.0.self_attn.q_proj.weight + model.layers.0.self_attn.q_proj.bias -> f32[2, 12, 32] -> view
  model.layers.0.self_attn.k_proj.weight + model.layers.0.self_attn.k_proj.bias -> f32[2, 12, 16] -> view_1
  model.layers.0.self_attn.v_proj.weight + model.layers.0.self_attn.v_proj.bias -> f32[2, 12, 16] -> view_2
untouched model.layers.0.self_attn.o_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.gate_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.up_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.down_proj.weight: output does not feed attention (targets='qkv')
untouched lm_head.weight: output does not feed attention (targets='qkv')""")

    def test_mistral(self) -> None:
        self.assertExpectedInline(plan(decoder_only("mistral"), ids()), """\
compress(hidden_states_2: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(hidden_states_2: f32[2, 12, 32])
  model.layers.0.self_attn.q_proj.weight -> f32[2, 12, 32] -> view
  model.layers.0.self_attn.k_proj.weight -> f32[2, 12, 16] -> view_1
  model.layers.0.self_attn.v_proj.weight -> f32[2, 12, 16] -> view_2
untouched model.layers.0.self_attn.o_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.gate_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.up_proj.weight: output does not feed attention (targets='qkv')
untouched model.layers.0.mlp.down_proj.weight: output does not feed attention (targets='qkv')
untouched lm_head.weight: output does not feed attention (targets='qkv')""")

    def test_gpt2_conv1d(self) -> None:
        self.assertExpectedInline(plan(gpt2(), ids()), """\
compress(view: f32[24, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(view: f32[24, 32])
  transformer.h.0.attn.c_attn.weight.T + transformer.h.0.attn.c_attn.bias -> f32[24, 96] -> x
untouched transformer.h.0.attn.c_proj.weight.T: output does not feed attention (targets='qkv')
untouched transformer.h.0.mlp.c_fc.weight.T: output does not feed attention (targets='qkv')
untouched transformer.h.0.mlp.c_proj.weight.T: output does not feed attention (targets='qkv')
untouched transformer.wte.weight: output does not feed attention (targets='qkv')""")

    def test_bert(self) -> None:
        self.assertExpectedInline(plan(encoder("bert"), ids()), """\
compress(embeddings_3: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(embeddings_3: f32[2, 12, 32])
  bert.encoder.layer.0.attention.self.query.weight + bert.encoder.layer.0.attention.self.query.bias -> f32[2, 12, 32] -> view
  bert.encoder.layer.0.attention.self.key.weight + bert.encoder.layer.0.attention.self.key.bias -> f32[2, 12, 32] -> view_1
  bert.encoder.layer.0.attention.self.value.weight + bert.encoder.layer.0.attention.self.value.bias -> f32[2, 12, 32] -> view_2
untouched bert.encoder.layer.0.attention.output.dense.weight: output does not feed attention (targets='qkv')
untouched bert.encoder.layer.0.intermediate.dense.weight: output does not feed attention (targets='qkv')
untouched bert.encoder.layer.0.output.dense.weight: output does not feed attention (targets='qkv')
untouched cls.predictions.transform.dense.weight: output does not feed attention (targets='qkv')
untouched bert.embeddings.word_embeddings.weight: output does not feed attention (targets='qkv')""")

    def test_roberta(self) -> None:
        self.assertExpectedInline(plan(encoder("roberta"), ids()), """\
compress(embeddings_3: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(embeddings_3: f32[2, 12, 32])
  roberta.encoder.layer.0.attention.self.query.weight + roberta.encoder.layer.0.attention.self.query.bias -> f32[2, 12, 32] -> view
  roberta.encoder.layer.0.attention.self.key.weight + roberta.encoder.layer.0.attention.self.key.bias -> f32[2, 12, 32] -> view_1
  roberta.encoder.layer.0.attention.self.value.weight + roberta.encoder.layer.0.attention.self.value.bias -> f32[2, 12, 32] -> view_2
untouched roberta.encoder.layer.0.attention.output.dense.weight: output does not feed attention (targets='qkv')
untouched roberta.encoder.layer.0.intermediate.dense.weight: output does not feed attention (targets='qkv')
untouched roberta.encoder.layer.0.output.dense.weight: output does not feed attention (targets='qkv')
untouched lm_head.dense.weight: output does not feed attention (targets='qkv')
untouched roberta.embeddings.word_embeddings.weight: output does not feed attention (targets='qkv')""")

    def test_bart_cross_attention(self) -> None:
        self.assertExpectedInline(plan(bart(), ids(), ids(seq=7), seq2seq=True), """\
compress(hidden_states_2: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(hidden_states_2: f32[2, 12, 32])
  model.encoder.layers.0.self_attn.q_proj.weight + model.encoder.layers.0.self_attn.q_proj.bias -> f32[2, 12, 32] -> view
  model.encoder.layers.0.self_attn.k_proj.weight + model.encoder.layers.0.self_attn.k_proj.bias -> f32[2, 12, 32] -> view_1
  model.encoder.layers.0.self_attn.v_proj.weight + model.encoder.layers.0.self_attn.v_proj.bias -> f32[2, 12, 32] -> view_2
compress(hidden_states_14: f32[2, 7, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[4, 32], i32[14], f32[14])
linear_group(hidden_states_14: f32[2, 7, 32])
  model.decoder.layers.0.self_attn.q_proj.weight + model.decoder.layers.0.self_attn.q_proj.bias -> f32[2, 7, 32] -> view_3
  model.decoder.layers.0.self_attn.k_proj.weight + model.decoder.layers.0.self_attn.k_proj.bias -> f32[2, 7, 32] -> view_4
  model.decoder.layers.0.self_attn.v_proj.weight + model.decoder.layers.0.self_attn.v_proj.bias -> f32[2, 7, 32] -> view_5
compress(hidden_states_17: f32[2, 7, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[4, 32], i32[14], f32[14])
linear_group(hidden_states_17: f32[2, 7, 32])
  model.decoder.layers.0.encoder_attn.q_proj.weight + model.decoder.layers.0.encoder_attn.q_proj.bias -> f32[2, 7, 32] -> view_6
compress(hidden_states_11: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(hidden_states_11: f32[2, 12, 32])
  model.decoder.layers.0.encoder_attn.k_proj.weight + model.decoder.layers.0.encoder_attn.k_proj.bias -> f32[2, 12, 32] -> view_7
  model.decoder.layers.0.encoder_attn.v_proj.weight + model.decoder.layers.0.encoder_attn.v_proj.bias -> f32[2, 12, 32] -> view_8
untouched model.encoder.layers.0.self_attn.out_proj.weight: output does not feed attention (targets='qkv')
untouched model.encoder.layers.0.fc1.weight: output does not feed attention (targets='qkv')
untouched model.encoder.layers.0.fc2.weight: output does not feed attention (targets='qkv')
untouched model.decoder.layers.0.self_attn.out_proj.weight: output does not feed attention (targets='qkv')
untouched model.decoder.layers.0.encoder_attn.out_proj.weight: output does not feed attention (targets='qkv')
untouched model.decoder.layers.0.fc1.weight: output does not feed attention (targets='qkv')
untouched model.decoder.layers.0.fc2.weight: output does not feed attention (targets='qkv')
untouched model.encoder.embed_tokens.weight: output does not feed attention (targets='qkv')""")

    def test_t5(self) -> None:
        self.assertExpectedInline(plan(t5(), ids(), ids(seq=7), seq2seq=True), """\
compress(normed_hidden_states: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(normed_hidden_states: f32[2, 12, 32])
  encoder.block.0.layer.0.SelfAttention.q.weight -> f32[2, 12, 32] -> view
  encoder.block.0.layer.0.SelfAttention.k.weight -> f32[2, 12, 32] -> view_1
  encoder.block.0.layer.0.SelfAttention.v.weight -> f32[2, 12, 32] -> view_2
compress(normed_hidden_states_1: f32[2, 7, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[4, 32], i32[14], f32[14])
linear_group(normed_hidden_states_1: f32[2, 7, 32])
  decoder.block.0.layer.0.SelfAttention.q.weight -> f32[2, 7, 32] -> view_3
  decoder.block.0.layer.0.SelfAttention.k.weight -> f32[2, 7, 32] -> view_4
  decoder.block.0.layer.0.SelfAttention.v.weight -> f32[2, 7, 32] -> view_5
compress(normed_hidden_states_2: f32[2, 7, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[4, 32], i32[14], f32[14])
linear_group(normed_hidden_states_2: f32[2, 7, 32])
  decoder.block.0.layer.1.EncDecAttention.q.weight -> f32[2, 7, 32] -> view_6
compress(hidden_states_10: f32[2, 12, 32], ratio=1/4, min_generators=1, eps=inf) -> (f32[6, 32], i32[24], f32[24])
linear_group(hidden_states_10: f32[2, 12, 32])
  decoder.block.0.layer.1.EncDecAttention.k.weight -> f32[2, 12, 32] -> view_7
  decoder.block.0.layer.1.EncDecAttention.v.weight -> f32[2, 12, 32] -> view_8
untouched encoder.block.0.layer.0.SelfAttention.o.weight: output does not feed attention (targets='qkv')
untouched encoder.block.0.layer.1.DenseReluDense.wi.weight: output does not feed attention (targets='qkv')
untouched encoder.block.0.layer.1.DenseReluDense.wo.weight: output does not feed attention (targets='qkv')
untouched decoder.block.0.layer.0.SelfAttention.o.weight: output does not feed attention (targets='qkv')
untouched decoder.block.0.layer.1.EncDecAttention.o.weight: output does not feed attention (targets='qkv')
untouched decoder.block.0.layer.2.DenseReluDense.wi.weight: output does not feed attention (targets='qkv')
untouched decoder.block.0.layer.2.DenseReluDense.wo.weight: output does not feed attention (targets='qkv')
untouched encoder.embed_tokens.weight: output does not feed attention (targets='qkv')""")


def _run(fn, inputs: tuple, model: torch.nn.Module, backend: str, proj: torch.Tensor):  # noqa: ANN202
    torch._dynamo.reset()
    options = {"ratio": 1, "min_tokens": 1, "min_generators": 1} if backend == "pamm" else None
    compiled = torch.compile(fn, backend=backend, options=options)
    with capture_rewrites() as records:
        saved = saved_for_backward(lambda: (compiled(*inputs) * proj).sum(), model)
    saved.output.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return saved, grads, records


@pytest.mark.parametrize("name", ["gpt2", pytest.param("bart", marks=pytest.mark.slow)])
def test_ratio_one_equals_plain_compile(name: str) -> None:
    torch.manual_seed(0)
    model = (gpt2() if name == "gpt2" else bart()).train()
    inputs = (ids(),) if name == "gpt2" else (ids(), ids(seq=7))
    fn = logits_of(model, seq2seq=name == "bart")
    proj = torch.randn(2, inputs[-1].shape[1], VOCAB)
    base_saved, base, _ = _run(fn, inputs, model, "inductor", proj)
    saved, got, records = _run(fn, inputs, model, "pamm", proj)
    assert sum(r.summary.count("linear_group(") for r in records) == (1 if name == "gpt2" else 4)
    torch.testing.assert_close(saved.output, base_saved.output, rtol=1e-4, atol=1e-4 * abs(base_saved.output.item()))
    assert base.keys() == got.keys()
    for key, grad in base.items():
        scale = grad.abs().max().item() or 1.0
        torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-4 * scale, msg=key)
    # At ratio 1, C (k = b rows) replaces X: only f and alpha (8 bytes a row) are added. They are arange(b) and
    # ones(b) there, which Inductor computes once per row count: BART's 4 groups have 2 (encoder 2 x 12, decoder 2 x 7).
    rows = 2 * SEQ if name == "gpt2" else 2 * (SEQ + 7)
    assert saved.nbytes - base_saved.nbytes == 8 * rows
