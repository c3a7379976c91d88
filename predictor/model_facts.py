"""What serving needs to know of a model's architecture, read from its config.json (a dict).

One definition each of the head counts (with Falcon's multi-query and grouped variants), the head size and the
KV bytes a token takes, used by the tensor-parallel check, the KV cache sizing, the weight manifest and the
catalog; the chart's `_sizing.tpl` follows the same rule (tests check they agree).
"""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


class ModelFactsError(ValueError):
    """config.json lacks what serving needs; the message names the key."""


def first_key(config: dict, *names: str, default=None):
    return next((config[n] for n in names if config.get(n) is not None), default)


def head_counts(config: dict) -> tuple[int, int]:
    """(attention heads, KV heads)."""
    heads = first_key(config, *HEAD_KEYS)
    if heads is None:
        raise ModelFactsError("no attention head count (num_attention_heads)")
    kv_heads = config.get("num_key_value_heads")
    if kv_heads is None:
        # Falcon: grouped KV heads with the new decoder architecture, one shared KV head with multi_query.
        if config.get("new_decoder_architecture") and config.get("num_kv_heads"):
            kv_heads = config["num_kv_heads"]
        elif config.get("multi_query"):
            kv_heads = 1
        else:
            kv_heads = heads
    return int(heads), int(kv_heads)


def check_sizes(config: dict) -> None:
    """Every head, layer and hidden size config.json gives is a positive integer (transformers divides by them)."""
    for key in (*HEAD_KEYS, *KV_HEAD_KEYS, *LAYER_KEYS, *HIDDEN_KEYS, "vocab_size"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelFactsError(f"{key} is {value!r}; it must be a positive integer")


def num_layers(config: dict) -> int:
    return int(first_key(config, *LAYER_KEYS, default=0))


def hidden_size(config: dict) -> int:
    return int(first_key(config, *HIDDEN_KEYS, default=0))


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or hidden_size(config) // head_counts(config)[0])


def kv_bytes_per_token(layers: int, kv_heads: int, head_size: int, dtype_bytes: int, tp_size: int = 1) -> int:
    """K and V bytes one token takes on one of tp_size ranks (each holds kv_heads / tp_size heads)."""
    return 2 * layers * max(1, kv_heads // tp_size) * head_size * dtype_bytes


def config_kv_bytes_per_token(config: dict, dtype_bytes: int, tp_size: int = 1) -> int:
    return kv_bytes_per_token(num_layers(config), head_counts(config)[1], head_dim(config), dtype_bytes, tp_size)
