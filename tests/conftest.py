"""Shared fixtures: the tiny models of tests/models.py, the same model loaded by transformers, a running server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on the CPU; read when they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
from models import make_llama
from servers import start
from transformers import AutoModelForCausalLM, AutoTokenizer

from predictor.tools.demo import cache_dir, save_llama2_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama2-tokenizer")
    save_llama2_tokenizer(path, cache_dir())  # the vocab download, when needed, is kept under .cache/
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny Llama with its weights in several safetensors shards, in a directory named tiny-llama."""
    return make_llama(tmp_path_factory.mktemp("sharded") / "tiny-llama", tokenizer_dir, max_shard_size="1MB")


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
