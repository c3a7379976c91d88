"""Load tokenizer and weights: device, dtype, tensor-parallel sharding and its head-count check."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from predictor import model_facts

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


def load_config(model_dir: Path, trust_remote_code: bool = False):
    if not (model_dir / "config.json").is_file():
        raise LoadError(f"model_dir: {model_dir} has no config.json")
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


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
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: Path, config, dtype: torch.dtype, device: torch.device, tp_size: int, trust_remote_code):
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if tp_size > 1:
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, distributed_config=DistributedConfig(tp_size=tp_size), **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, device_map=device, **kwargs)
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
