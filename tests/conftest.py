"""Shared fixtures: small real-architecture models with the real Llama-2 tokenizer, and running servers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on the CPU; read when they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
from servers import start
from transformers import AutoModelForCausalLM, AutoTokenizer

from predictor.tools.demo import cache_dir, save_llama2_tokenizer, save_random_llama

# 4 query heads and 2 KV heads: tensor-parallel sizes 1 and 2 are valid.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=32000, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama2-tokenizer")
    save_llama2_tokenizer(path, cache_dir())  # the vocab download, when needed, is kept under .cache/
    return path


def make_llama(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
    save_random_llama(path, {**TINY_LLAMA, **overrides}, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def reference(tiny_llama):
    """The same model loaded the plain transformers way, to compare against."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    running = start(tiny_llama, tmp_path_factory.mktemp("logs") / "server.log", "--max_num_seqs=8", "--max_queue=64",
                    "--max_model_len=512")
    yield running
    running.stop()


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
