"""A model directory that cannot be served, without a manifest to say so: the server prints one line naming the
file and the problem and exits 2, never a traceback. And a context past a sliding window is not served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import REPO, free_port, predictor_env
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from predictor import loader


def truncate_weights(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def break_config_json(model_dir: Path) -> None:
    path = model_dir / "config.json"
    path.write_text(path.read_text()[:40])


def zero_attention_heads(model_dir: Path) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_attention_heads": 0}))


def truncate_tokenizer(model_dir: Path) -> None:
    path = model_dir / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:1000])


def remove_tokenizer(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").unlink()


def soft_cap_attention(model_dir: Path) -> None:
    """As Gemma 2's: the paged attention does not soft-cap, so the outputs would differ from transformers'."""
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "attn_logit_softcapping": 50.0}))


BREAKAGES = {  # how the directory is broken: (the file named, the problem said)
    truncate_weights: ("model.safetensors", "unreadable weights (truncated or corrupted?)"),
    break_config_json: ("config.json", "not valid JSON"),
    zero_attention_heads: ("config.json", "num_attention_heads is 0; it must be a positive integer"),
    truncate_tokenizer: ("tokenizer.json", "not valid JSON"),
    remove_tokenizer: ("the tokenizer in", "cannot be loaded"),
    soft_cap_attention: ("config.json", "attn_logit_softcapping is set"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES), ids=lambda breakage: breakage.__name__)
def test_a_broken_model_dir_is_one_line_and_exit_2(tiny_llama, tmp_path, breakage):
    model_dir = shutil.copytree(tiny_llama, tmp_path / "model")
    breakage(model_dir)
    result = subprocess.run([sys.executable, "-m", "predictor", f"--model_dir={model_dir}",
                             f"--http_port={free_port()}", f"--grpc_port={free_port()}"],
                            cwd=REPO, env=predictor_env(), capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and " ERROR " not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("llm-predictor:")]
    named, problem = BREAKAGES[breakage]
    assert str(model_dir) in line and named in line and problem in line, line


@pytest.mark.parametrize("config, requested, served", [
    (MistralConfig(max_position_embeddings=32768, sliding_window=4096), None, 4096),  # Mistral v0.1
    (MistralConfig(max_position_embeddings=32768, sliding_window=None), None, 32768),  # v0.2
    (MistralConfig(max_position_embeddings=32768, sliding_window=4096), 2048, 2048),
    (Qwen2Config(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False), None, 32768),
    (LlamaConfig(max_position_embeddings=4096), None, 4096),
])
def test_context_is_served_up_to_a_sliding_window(config, requested, served):
    assert loader.resolve_max_model_len(Path("m"), config, requested) == served


def test_asking_past_a_sliding_window_is_refused_naming_max_model_len():
    config = MistralConfig(max_position_embeddings=32768, sliding_window=4096)
    with pytest.raises(loader.LoadError, match=r"^max_model_len: 8192 is longer than the model's sliding window "
                                               r"\(4096, m/config.json\)"):
        loader.resolve_max_model_len(Path("m"), config, 8192)
