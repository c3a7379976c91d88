"""The slot KV cache under each architecture the product names: batched greedy decode equals model.generate."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from predictor.runner import ModelRunner

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=500)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, intermediate_size=128, num_key_value_heads=2)),
    "falcon-multi-query": lambda: FalconForCausalLM(FalconConfig(**SMALL, multi_query=True)),
    "falcon-grouped": lambda: FalconForCausalLM(
        FalconConfig(**SMALL, new_decoder_architecture=True, num_kv_heads=2)),
}
PROMPTS = [[1, 5, 9, 200, 3], [1, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_batched_greedy_decode_equals_generate(architecture):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().eval()
    steps = 10
    expected = [model.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    runner = ModelRunner(model, num_slots=4, max_len=64)
    generated = [[int(runner.prefill(slot, p).argmax())] for slot, p in enumerate(PROMPTS)]
    positions = [len(p) for p in PROMPTS]
    for _ in range(steps - 1):
        logits = runner.decode([g[-1] for g in generated], positions)
        for row, tokens in enumerate(generated):
            tokens.append(int(logits[row].argmax()))
        positions = [p + 1 for p in positions]
    assert generated == expected


def test_moving_a_slot_keeps_its_sequence():
    torch.manual_seed(0)
    model = ARCHITECTURES["llama"]().eval()
    runner = ModelRunner(model, num_slots=2, max_len=32)
    prompt = PROMPTS[2]
    first = runner.prefill(1, prompt)
    runner.move(1, 0, len(prompt))
    token = int(first.argmax())
    moved = runner.decode([token], [len(prompt)])[0]
    reference = model(torch.tensor([prompt + [token]])).logits[0, -1]
    assert torch.allclose(moved, reference, atol=1e-5)
