"""The tests' one model factory: small random Llamas of the real architecture with the real Llama-2 tokenizer,
saved as Hugging Face directories; and model.generate's greedy text, to hold the server's output to."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from predictor.tools.demo import save_random_llama

# 4 query heads and 2 KV heads: tensor-parallel sizes 1 and 2 are valid.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=32000, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def make_llama(path: Path, tokenizer_dir: Path, *, max_shard_size: str | None = None, **overrides) -> Path:
    """A tiny Llama (TINY_LLAMA with overrides) in path; max_shard_size splits its weights as the Hub does."""
    shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
    save_random_llama(path, {**TINY_LLAMA, **overrides}, seed=0, max_shard_size=max_shard_size)
    return path


def greedy_reference(reference, prompt: str, max_new_tokens: int) -> str:
    """model.generate's greedy text after the prompt, decoded the way a completion is."""
    model, tokenizer = reference
    prompt_ids = tokenizer(prompt).input_ids
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0)[0].tolist()
    full = tokenizer.decode(out, skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    assert full.startswith(head)
    return full[len(head):]
