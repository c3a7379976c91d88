"""Load tokenizer and weights: device, dtype, tensor-parallel sharding and its head-count check.

A model directory that cannot be served (unreadable config.json, sizes of zero, a truncated weight file, a broken
tokenizer) is a LoadError naming the file and the problem, found before the weights load where it can be.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from predictor import model_facts

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadError(RuntimeError):
    """The model cannot be served as configured; the message is one line."""


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LoadError("device: cuda was asked for but no CUDA device is visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device, config) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cpu":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "generation_config.json")


def load_config(model_dir: Path, trust_remote_code: bool = False):
    path = model_dir / "config.json"
    if not path.is_file():
        raise LoadError(f"model_dir: {model_dir} has no config.json")
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise LoadError(f"{path}: not a JSON object")
    try:
        model_facts.check_sizes(raw.get("text_config") or raw)
    except model_facts.ModelFactsError as err:
        raise LoadError(f"{path}: {err}") from None
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers refuses a config in many ways (OSError, ValueError, KeyError, ...)
        raise LoadError(f"{path}: transformers cannot use it: {_one_line(err)}") from None


def resolve_max_model_len(model_dir: Path, config, requested: int | None) -> int:
    """The context the engine serves: `requested`, else the model's max_position_embeddings (2048 if it has none).

    The paged attention attends to a sequence's whole context with plain scaled dot products. Within a sliding
    window that is what the model does, so a model with one (Mistral v0.1, Gemma 2) is served up to its window;
    logit soft-capping inside attention (Gemma 2) it does not do at all, so such a model is refused rather than
    served with different outputs."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    path = model_dir / "config.json"
    if getattr(text, "attn_logit_softcapping", None):
        raise LoadError(f"{path}: attn_logit_softcapping is set: this server's paged attention does not soft-cap "
                        "attention logits, so the model would answer differently from transformers")
    longest = requested or getattr(text, "max_position_embeddings", None) or 2048
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    if window and longest > window:
        if requested:
            raise LoadError(f"max_model_len: {requested} is longer than the model's sliding window ({window}, "
                            f"{path}); this server attends to whole contexts, so it serves up to {window} tokens")
        logger.info("max_model_len %d: the model's sliding window (its max_position_embeddings is %d); this server "
                    "attends to whole contexts, which within the window is what the model does", window, longest)
        longest = window
    return longest


def check_model_files(model_dir: Path) -> None:
    """The tokenizer's JSON files parse and every safetensors file's header matches its size (a file cut short
    is found here, in seconds, not after minutes of loading the others)."""
    for name in TOKENIZER_JSON_FILES:
        if (model_dir / name).is_file():
            _read_json(model_dir / name)
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as err:
            raise LoadError(f"{path}: unreadable weights (truncated or corrupted?): {_one_line(err)}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except ValueError as err:  # also UnicodeDecodeError
        raise LoadError(f"{path}: not valid JSON: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def check_tensor_parallel_size(config, tp_size: int) -> None:
    heads, kv_heads = model_facts.head_counts(text_config_dict(config))
    if heads % tp_size or kv_heads % tp_size:
        valid = [n for n in range(1, heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise LoadError(
            f"tensor_parallel_size: {tp_size} does not divide the model's {heads} attention heads and "
            f"{kv_heads} KV heads; valid sizes: {valid}"
        )


def text_config_dict(config) -> dict:
    """The language model's part of a (possibly multimodal) transformers config, as config.json spells it."""
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).to_dict()


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # a tokenizer file transformers cannot use, whichever way it says so
        raise LoadError(f"model_dir: the tokenizer in {model_dir} cannot be loaded: {_one_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, config, dtype: torch.dtype, device: torch.device, tp_size: int, trust_remote_code):
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if tp_size > 1:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_size=tp_size)
    else:
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, **kwargs)
    except (OSError, SafetensorError) as err:  # a weight file missing or unreadable
        raise LoadError(f"model_dir: the weights in {model_dir} cannot be loaded: {_one_line(err)}") from None
    return model.eval()


def eos_token_ids(model_dir: Path, tokenizer, config) -> set[int]:
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = getattr(config, "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
