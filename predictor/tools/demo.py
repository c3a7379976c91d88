"""The embedded default model: a ~58M-parameter Llama with random weights and the real Llama-2 tokenizer.

Its text is gibberish by nature; it exists so that `make run` serves something real on a fresh machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from predictor.api.chat_templates import BUILTIN

logger = logging.getLogger(__name__)

LLAMA_VOCAB = "ggml-vocab-llama-spm.gguf"
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
DEMO_SEED = 0
DEMO_ARCHITECTURE = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
    vocab_size=32000, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def cache_dir() -> Path:
    return Path(os.environ.get("PREDICTOR_CACHE_DIR", Path.cwd() / ".cache"))


def ensure_demo_model(root: Path | None = None) -> Path:
    """Create the demo model directory once and return it. Processes that start together (the ranks of a
    tensor-parallel server, one per node) wait for the first one's, under a file lock: a second writer would
    replace files the first is already reading."""
    base = root or cache_dir()
    target = base / "demo-model"
    if (target / "model.safetensors").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "demo-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file():
            return target
        logger.info("creating the demo model in %s (once)", target)
        staging = Path(tempfile.mkdtemp(dir=base))
        save_llama2_tokenizer(staging, base)
        save_random_llama(staging, DEMO_ARCHITECTURE, seed=DEMO_SEED)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete one, from before
        staging.rename(target)
    return target


def save_random_llama(model_dir: Path, architecture: dict, seed: int, dtype: str = "float32",
                      max_shard_size: str | None = None) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**architecture, dtype=dtype)
    model = LlamaForCausalLM(config).eval()
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(model_dir, safe_serialization=True, **shards)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(model_dir)


def save_llama2_tokenizer(model_dir: Path, downloads: Path) -> None:
    """The real Llama-2 SentencePiece vocabulary, from llama.cpp's test vocab file, with a llama-2 chat template."""
    from transformers import AutoTokenizer

    vocab = find_llama_vocab(downloads)
    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    tokenizer.chat_template = BUILTIN["llama-2"]
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(model_dir)


def find_llama_vocab(downloads: Path) -> Path:
    shared = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / LLAMA_VOCAB
    if shared.is_file():
        return shared
    extracted = downloads / "vocab" / LLAMA_VOCAB
    if not extracted.is_file():
        extract_vocab_from_sdist(extracted)
    return extracted


def extract_vocab_from_sdist(dest: Path) -> None:
    """llama-cpp-python's sdist on PyPI carries the same file under vendor/llama.cpp/models/."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q", "-d", tmp,
             LLAMA_CPP_SDIST],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith(f"vendor/llama.cpp/models/{LLAMA_VOCAB}"))
            with archive.extractfile(member) as src, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as out:
                shutil.copyfileobj(src, out)
        os.replace(out.name, dest)  # readers memory-map it: none may ever see half a file
