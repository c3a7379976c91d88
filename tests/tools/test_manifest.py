"""The weight manifest: what it records, and what it refuses (issue 4)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
from models import TINY_LLAMA
from safetensors import safe_open

from predictor.tools.manifest import (
    MANIFEST_NAME,
    ManifestError,
    head_counts,
    manifest_main,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def model(sharded_llama, tmp_path) -> Path:
    return Path(shutil.copytree(sharded_llama, tmp_path / "tiny-llama"))


def shards(model: Path) -> list[Path]:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return sorted(model / name for name in set(index["weight_map"].values()))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_manifest_records_files_sizes_hashes_and_sizing(model):
    manifest = write_manifest(model)

    assert json.loads((model / MANIFEST_NAME).read_text()) == manifest
    on_disk = sorted(p.name for p in model.iterdir() if p.name != MANIFEST_NAME)
    assert [f["path"] for f in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        data = (model / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    assert len(shards(model)) > 1, "the fixture should be sharded"
    assert manifest["weight_bytes"] == sum(p.stat().st_size for p in shards(model))

    expected_params = 0
    for shard in shards(model):
        with safe_open(str(shard), "np") as f:
            names = f.keys()
            expected_params += sum(math.prod(f.get_slice(name).get_shape()) for name in names)
    assert manifest["parameter_count"] == expected_params
    assert manifest["model_name"] == "tiny-llama"
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["dtype"] == "float32"
    assert (manifest["num_attention_heads"], manifest["num_key_value_heads"]) == (4, 2)
    assert manifest["tensor_parallel_sizes"] == [1, 2]
    kv_per_token = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head_dim, float32
    assert manifest["kv_bytes_per_token"] == kv_per_token
    context = TINY_LLAMA["max_position_embeddings"]
    assert manifest["estimated_gpu_memory_bytes"] == math.ceil(
        1.1 * (manifest["weight_bytes"] + kv_per_token * context * 4))


def test_cli_writes_manifest_that_then_verifies(model, capsys):
    assert manifest_main(["--model_dir", str(model), "--model_name", "tiny"]) == 0
    assert "tensor parallel sizes [1, 2]" in capsys.readouterr().out
    assert verify_manifest(model, "full")["model_name"] == "tiny"
    assert verify_manifest(model, "size") is not None


def test_flipped_byte_passes_size_check_and_fails_full_check(model):
    write_manifest(model)
    shard = shards(model)[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))

    assert verify_manifest(model, "size") is not None
    with pytest.raises(ManifestError) as excinfo:
        verify_manifest(model, "full")
    message = one_line_error(excinfo)
    assert str(shard) in message and "sha256" in message


@pytest.mark.parametrize("change, words", [(-7, "truncated"), (+3, "unexpected bytes")])
def test_shard_of_wrong_length_refused(model, change, words):
    shard = shards(model)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:change] if change < 0 else data + b"\0" * change)

    with pytest.raises(ManifestError) as excinfo:
        write_manifest(model)
    message = one_line_error(excinfo)
    assert str(shard) in message and words in message
    assert not (model / MANIFEST_NAME).exists()


def test_truncated_file_after_build_refused_at_startup(model):
    write_manifest(model)
    shard = shards(model)[0]
    shard.write_bytes(shard.read_bytes()[:100])

    with pytest.raises(ManifestError) as excinfo:
        verify_manifest(model, "size")
    message = one_line_error(excinfo)
    assert str(shard) in message and "truncated" in message
    assert verify_manifest(model, "off") is None


def test_missing_shard_refused(model):
    shard = shards(model)[-1]
    shard.unlink()
    with pytest.raises(ManifestError) as excinfo:
        write_manifest(model)
    assert str(shard) in one_line_error(excinfo) and "missing" in str(excinfo.value)


def test_missing_file_after_build_refused_at_startup(model):
    write_manifest(model)
    (model / "tokenizer.json").unlink()
    with pytest.raises(ManifestError) as excinfo:
        verify_manifest(model, "size")
    assert str(model / "tokenizer.json") in one_line_error(excinfo)


def test_corrupt_header_refused(model):
    shard = shards(model)[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"@@@@"
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as excinfo:
        write_manifest(model)
    assert str(shard) in one_line_error(excinfo) and "not a valid safetensors" in str(excinfo.value)


def test_pickled_weights_refused_unless_allowed(model, capsys):
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": [0.0]}))

    with pytest.raises(ManifestError) as excinfo:
        write_manifest(model)
    assert "pytorch_model.bin" in one_line_error(excinfo) and "--allow_pickle" in str(excinfo.value)

    assert manifest_main(["--model_dir", str(model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "pickled" in err

    manifest = write_manifest(model, allow_pickle=True)
    assert "pytorch_model.bin" in [f["path"] for f in manifest["files"]]


@pytest.mark.parametrize("removed, words", [("config.json", "config.json"),
                                            ("tokenizer.json", "no tokenizer files")])
def test_config_and_tokenizer_required(model, removed, words):
    (model / removed).unlink()
    with pytest.raises(ManifestError) as excinfo:
        write_manifest(model)
    assert words in one_line_error(excinfo)


def test_no_weights_refused(model):
    for shard in shards(model):
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    with pytest.raises(ManifestError, match="no weights"):
        write_manifest(model)


def test_hidden_files_left_out(model):
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    paths = [f["path"] for f in write_manifest(model)["files"]]
    assert not [p for p in paths if p.startswith(".")]


def test_verify_without_manifest_or_with_bad_mode(model):
    assert verify_manifest(model, "full") is None
    with pytest.raises(ManifestError, match="expected one of off, size, full"):
        verify_manifest(model, "paranoid")


def test_verify_refuses_paths_outside_the_model_dir(model):
    write_manifest(model)
    manifest = json.loads((model / MANIFEST_NAME).read_text())
    manifest["files"].append({"path": "../outside", "size": 1, "sha256": "0" * 64})
    (model / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="outside"):
        verify_manifest(model, "size")


@pytest.mark.parametrize("config, counts", [
    ({"num_attention_heads": 71, "multi_query": True}, (71, 1)),  # falcon-7b
    ({"num_attention_heads": 128, "new_decoder_architecture": True, "num_kv_heads": 8}, (128, 8)),  # falcon-40b
    ({"num_attention_heads": 32, "num_key_value_heads": 8}, (32, 8)),  # mistral-7b
    ({"n_head": 12}, (12, 12)),  # gpt2
])
def test_head_counts_across_architectures(config, counts):
    assert head_counts(config, Path("config.json")) == counts
