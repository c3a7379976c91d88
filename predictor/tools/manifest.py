"""The weight manifest baked next to a model: validate a model directory, write its manifest, verify it.

`llm-predictor manifest --model_dir DIR` writes DIR/model-manifest.json; the predictor calls
`verify_manifest(model_dir, mode)` at start-up and refuses a tampered, truncated or incomplete model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from collections import Counter
from pathlib import Path

from predictor import model_facts
from predictor.tools import sizing

MANIFEST_NAME = "model-manifest.json"
MANIFEST_VERSION = 1
VERIFY_MODES = ("off", "size", "full")

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Either file is enough for a fast or sentencepiece tokenizer; vocab.json + merges.txt for byte-level BPE.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
# Some Hub configs predate max_position_embeddings (falcon-7b); 2048 is their trained context.
FALLBACK_MAX_CONTEXT = 2048
MAX_HEADER_BYTES = 100 * 2**20
HASH_CHUNK = 8 * 2**20

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "I8": "int8", "U8": "uint8", "I32": "int32",
                      "I64": "int64", "BOOL": "bool"}


class ManifestError(Exception):
    """A model directory or its manifest is unusable; the message is one line naming the bad file."""


# --- reading the directory --------------------------------------------------------------------------


def model_files(model_dir: Path) -> list[str]:
    """Every file the image ships, as sorted POSIX paths relative to model_dir.

    Hidden files and directories (.git, .gitattributes, the .cache of Hub downloads) and the manifest
    itself are left out.
    """
    files = []
    for path in model_dir.rglob("*"):
        rel = path.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() == MANIFEST_NAME:
            continue
        if path.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ManifestError(f"{path}: missing (every model directory needs its config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{path}: not a JSON object")
    return config


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a safetensors file and the file size its header implies, without loading it."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit in {size} bytes")
            header = json.loads(f.read(header_len))
        tensors = {name: info for name, info in header.items() if name != "__metadata__"}
        data_end = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ManifestError(f"{path}: not a valid safetensors file ({exc})") from None
    return tensors, 8 + header_len + data_end


def check_safetensors_complete(path: Path) -> dict:
    if not path.is_file():
        raise ManifestError(f"{path}: missing")
    tensors, expected = read_safetensors_header(path)
    size = path.stat().st_size
    if size < expected:
        raise ManifestError(f"{path}: truncated ({size} bytes, its header says {expected})")
    if size > expected:
        raise ManifestError(f"{path}: {size - expected} unexpected bytes after the tensor data")
    return tensors


def indexed_shards(model_dir: Path, index_name: str) -> list[str]:
    path = model_dir / index_name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{path}: unreadable shard index ({exc})") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ManifestError(f"{path}: shard name {shard!r} points outside the model directory")
    return shards


def has_tokenizer(files: set[str]) -> bool:
    return any(all(name in files for name in group) for group in TOKENIZER_FILES)


# --- validation ---------------------------------------------------------------------------------------


def validate_model_dir(model_dir: str | Path, allow_pickle: bool = False) -> dict:
    """Check a model directory is complete and safe to ship; returns the safetensors tensor tables by file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ManifestError(f"{model_dir}: not a directory")
    read_config(model_dir)
    files = model_files(model_dir)
    top_level = {f for f in files if "/" not in f}
    if not has_tokenizer(top_level):
        raise ManifestError(f"{model_dir}: no tokenizer files (need tokenizer.json or tokenizer.model)")

    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise ManifestError(f"{model_dir / pickles[0]}: pickled weights refused "
                            "(convert to safetensors, or pass --allow_pickle)")

    tables: dict[str, dict] = {}
    if SAFETENSORS_INDEX in top_level:
        for shard in indexed_shards(model_dir, SAFETENSORS_INDEX):
            tables[shard] = check_safetensors_complete(model_dir / shard)
    for name in files:
        if name.endswith(".safetensors") and name not in tables:
            tables[name] = check_safetensors_complete(model_dir / name)
    if PICKLE_INDEX in top_level:
        for shard in indexed_shards(model_dir, PICKLE_INDEX):
            if not (model_dir / shard).is_file():
                raise ManifestError(f"{model_dir / shard}: missing (named in {PICKLE_INDEX})")
    if not tables and not pickles:
        raise ManifestError(f"{model_dir}: no weights (expected *.safetensors files)")
    return tables


# --- the manifest -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def head_counts(config: dict, config_path: Path) -> tuple[int, int]:
    try:
        return model_facts.head_counts(config)
    except model_facts.ModelFactsError as err:
        raise ManifestError(f"{config_path}: {err}") from None


def model_dtype(config: dict, tables: dict) -> str:
    dtype = model_facts.first_key(config, "dtype", "torch_dtype")
    if isinstance(dtype, str):
        return dtype
    counts = Counter(info.get("dtype") for table in tables.values() for info in table.values())
    if counts:
        return SAFETENSORS_DTYPES.get(counts.most_common(1)[0][0], "float32")
    return "float32"


def architecture_facts(model_dir: Path) -> dict:
    """What GPU sizing needs from config.json, under the catalog's field names."""
    config_path = model_dir / "config.json"
    config = read_config(model_dir)
    heads, kv_heads = head_counts(config, config_path)
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    return {
        "architecture": architectures[0],
        "num_hidden_layers": model_facts.num_layers(config),
        "hidden_size": model_facts.hidden_size(config),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": model_facts.head_dim(config),
        "vocab_size": int(config.get("vocab_size") or 0),
        "max_context": int(model_facts.first_key(config, "max_position_embeddings", "n_positions", "max_seq_len",
                                                 default=FALLBACK_MAX_CONTEXT)),
    }


def build_manifest(model_dir: Path, tables: dict, entries: list[dict], model_name: str) -> dict:
    facts = architecture_facts(model_dir)
    dtype = model_dtype(read_config(model_dir), tables)
    sizes = {e["path"]: e["size"] for e in entries}
    if tables:
        weight_bytes = sum(sizes[name] for name in tables)
        parameter_count = sum(_numel(info["shape"]) for table in tables.values() for info in table.values())
    else:  # pickled weights only (--allow_pickle): counting parameters would mean unpickling them
        weight_bytes = sum(size for path, size in sizes.items() if path.endswith(PICKLE_SUFFIXES))
        parameter_count = None

    kv_per_token = model_facts.kv_bytes_per_token(facts["num_hidden_layers"], facts["num_key_value_heads"],
                                             facts["head_dim"], model_facts.DTYPE_BYTES.get(dtype, 4))
    return {
        "manifest_version": MANIFEST_VERSION,
        "model_name": model_name,
        **facts,
        "parameter_count": parameter_count,
        "dtype": dtype,
        "weight_bytes": weight_bytes,
        "total_bytes": sum(sizes.values()),
        "kv_bytes_per_token": kv_per_token,
        "tensor_parallel_sizes": sizing.tensor_parallel_sizes(facts["num_attention_heads"],
                                                              facts["num_key_value_heads"]),
        "estimated_gpu_memory_bytes": sizing.estimate_gpu_memory_bytes(weight_bytes, kv_per_token,
                                                                       facts["max_context"]),
        "files": entries,
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


def write_manifest(model_dir: str | Path, allow_pickle: bool = False, model_name: str | None = None) -> dict:
    """Validate model_dir, then write model_dir/model-manifest.json; returns the manifest."""
    model_dir = Path(model_dir)
    tables = validate_model_dir(model_dir, allow_pickle=allow_pickle)
    entries = [{"path": rel, "size": (model_dir / rel).stat().st_size, "sha256": sha256_file(model_dir / rel)}
               for rel in model_files(model_dir)]
    manifest = build_manifest(model_dir, tables, entries, model_name or model_dir.resolve().name)
    target = model_dir / MANIFEST_NAME
    try:
        target.write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise ManifestError(f"{target}: cannot write the manifest ({exc.strerror})") from None
    return manifest


def manifest_digest(model_dir: str | Path) -> str:
    """The OCI-style digest of the written manifest, for the image label."""
    return "sha256:" + sha256_file(Path(model_dir) / MANIFEST_NAME)


# --- verification at start-up -------------------------------------------------------------------------


def load_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, list) or not all({"path", "size", "sha256"} <= set(f) for f in files):
            raise ValueError("each file entry needs path, size and sha256")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    return manifest


def verify_manifest(model_dir: str | Path, mode: str = "size") -> dict | None:
    """Check model_dir against its manifest, if it has one: sizes with "size", sizes and sha256 with "full".

    Returns the manifest (None when skipped or absent); raises ManifestError naming the first bad file.
    """
    if mode not in VERIFY_MODES:
        raise ManifestError(f"--verify_weights {mode!r}: expected one of {', '.join(VERIFY_MODES)}")
    model_dir = Path(model_dir)
    if mode == "off":
        return None
    manifest = load_manifest(model_dir)
    if manifest is None:
        return None
    root = model_dir.resolve()
    for entry in manifest["files"]:
        path = model_dir / entry["path"]
        if not path.resolve().is_relative_to(root):
            raise ManifestError(f"{model_dir / MANIFEST_NAME}: file {entry['path']!r} lies outside {model_dir}")
        if not path.is_file():
            raise ManifestError(f"{path}: missing (listed in {MANIFEST_NAME})")
        size = path.stat().st_size
        if size != entry["size"]:
            state = "truncated" if size < entry["size"] else "changed"
            raise ManifestError(f"{path}: {state}, {size} bytes where the manifest says {entry['size']}")
        if mode == "full" and sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path}: sha256 differs from the manifest (tampered or corrupted)")
    return manifest


# --- `llm-predictor manifest` -------------------------------------------------------------------------


def manifest_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llm-predictor manifest",
        description=f"Validate a model directory and write DIR/{MANIFEST_NAME} (sizes, sha256, GPU sizing).")
    parser.add_argument("--model_dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--model_name", help="name recorded in the manifest (default: the directory's name)")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="accept pickled .bin/.pt weights (unpickling can run arbitrary code)")
    args = parser.parse_args(argv)
    try:
        manifest = write_manifest(args.model_dir, allow_pickle=args.allow_pickle, model_name=args.model_name)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    params = manifest["parameter_count"]
    print(f"wrote {Path(args.model_dir) / MANIFEST_NAME}: {manifest['architecture']}, "
          f"{params if params is not None else 'unknown'} parameters, {len(manifest['files'])} files, "
          f"{manifest['total_bytes']} bytes, tensor parallel sizes {manifest['tensor_parallel_sizes']}, "
          f"~{manifest['estimated_gpu_memory_bytes'] / 2**30:.1f} GiB GPU memory")
    return 0


if __name__ == "__main__":
    sys.exit(manifest_main())
