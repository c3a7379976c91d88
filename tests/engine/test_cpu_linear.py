"""Linear layers packed for oneDNN on the CPU (engine/cpu_linear.py): the same logits, tied weights kept, the
unpacked copies released, and only float32 models packed by the runner."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from predictor.engine import cpu_linear
from predictor.engine.model_runner import ModelRunner

from .test_model_runner import model_of


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_packed_linears_give_the_same_logits_and_keep_tied_weights():
    model = tied_llama()
    ids = torch.tensor([[1, 5, 9, 200, 3, 7]])
    with torch.inference_mode():
        before = model(ids).logits
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert cpu_linear.unavailable() is None
    assert cpu_linear.pack_linears(model) == len(linears)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: still the embedding's
    assert model.model.embed_tokens.weight.shape == (300, 64)
    assert all(m.weight.numel() == 0 for m in linears if m is not model.lm_head)  # not held twice
    with torch.inference_mode():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_the_runner_packs_float32_models_only():
    packed = ModelRunner(model_of("llama"), block_size=16, max_model_len=128).model
    assert packed.model.layers[0].mlp.down_proj.weight.numel() == 0
    kept = ModelRunner(model_of("llama").to(torch.bfloat16), block_size=16, max_model_len=128).model
    assert kept.model.layers[0].mlp.down_proj.weight.numel() > 0
