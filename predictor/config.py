"""Settings: CLI flags (KServe style) > env vars PREDICTOR_* > YAML file (--config) > defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from predictor.engine.sampling_params import RepetitionPenalty, Temperature, TopK, TopP

DEFAULT_MODEL_DIR = Path("/mnt/models")
GENERATION_DEFAULTS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
CPU_KV_CACHE_BYTES = 2 * 2**30
DEFAULT_SHUTDOWN_TIMEOUT_S = 45.0  # the chart's terminationGracePeriodSeconds (60) less its margin (15)
ALL_INTERFACES = "0.0.0.0"
BUILTIN_CHAT_TEMPLATES = ("llama-2", "mistral", "falcon", "vicuna", "dolly", "chatml")


class ConfigError(ValueError):
    """An invalid setting; the message is one line naming it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREDICTOR_", extra="forbid", validate_default=True)

    # KServe's own flags, same names and defaults.
    model_name: str | None = Field(None, description="Name the model is served under (default: 'model', or 'demo').")
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Hugging Face model directory.")
    http_port: int = Field(8080, ge=1, le=65535)
    grpc_port: int = Field(8081, ge=1, le=65535)
    enable_grpc: bool = False

    host: str = Field(
        ALL_INTERFACES, min_length=1, description="Address the HTTP server listens on: 0.0.0.0 (every interface, as "
        "KServe listens in a pod) or 127.0.0.1 to serve this machine only."
    )

    config: Path | None = Field(None, description="YAML file with any of these settings.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1, le=512)
    max_model_len: int | None = Field(
        None, ge=16, description="Prompt + generated tokens per sequence (default: the model's "
        "max_position_embeddings, capped at its sliding window if it has one)."
    )
    max_num_seqs: int = Field(256, ge=1, le=4096, description="Sequences decoded together in one batch.")
    max_queue: int = Field(256, ge=0, description="Waiting generations and embedding inputs beyond which new ones "
                           "get 429; a request with more items (instances, inputs, prompts x n) is a 400.")
    gpu_memory_utilization: float = Field(
        0.90, gt=0.0, le=1.0, description="CUDA: share of the device's memory for weights, activations, CUDA graphs "
        "and the KV cache, which gets what the weights, the worst step (as vLLM does) and the graphs leave."
    )
    kv_cache_bytes: ByteSize | None = Field(
        None, gt=0, description="KV cache per rank, e.g. 2GiB, instead of sizing it from gpu_memory_utilization "
        f"(the default on the CPU is {CPU_KV_CACHE_BYTES // 2**30}GiB)."
    )
    block_size: Literal[16, 32, 64, 128] = Field(16, description="Tokens per KV cache block.")
    enforce_eager: bool = Field(
        False, description="CUDA: capture no CUDA graphs; every step runs eagerly (vLLM's flag). Graphs replay "
        "decode-only steps of up to 512 sequences; their memory comes out of the KV cache's budget."
    )
    async_scheduling: bool = Field(
        False, description="Overlap the host's work for the next engine step (scheduling, building its inputs) with "
        "the device's for this one; the next step takes the tokens this one samples on the device (vLLM's flag). "
        "Steps with a request held to structured output stay synchronous. Off by default: it has not yet run on a "
        "GPU. Not with tensor_parallel_size > 1."
    )
    max_prefill_tokens: int = Field(2048, ge=16, description="Prompt tokens prefilled per engine step, and "
                                    "embedding tokens (padded) computed between two steps.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of prompt prefixes earlier requests computed (a system prompt, earlier "
        "turns): full blocks are kept, by content, until their memory is needed. Off: every prompt is computed whole."
    )
    chat_template: str | None = Field(None, description=f"One of {BUILTIN_CHAT_TEMPLATES} or a Jinja file.")
    max_request_bytes: int = Field(4 * 2**20, ge=1024, description="Larger request bodies are refused with 413.")
    max_schema_bytes: int = Field(
        32 * 2**10, ge=64, description="Structured output: larger JSON schemas (serialized) are refused with 400; "
        "compiling one costs more than its size (up to seconds at the default)."
    )
    max_header_bytes: int = Field(
        64 * 2**10, ge=1024, description="A request line and headers larger than this are refused with 431 before "
        "more is read."
    )
    max_headers: int = Field(100, ge=8, description="Requests with more header lines are refused with 431.")
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection has to send a request's line and headers (from when it opens "
        "or the request's first byte); then 408 and the connection is closed."
    )
    body_timeout: float = Field(
        60.0, gt=0, description="Seconds a request has to send its whole body after its headers; then 408 and the "
        "connection is closed."
    )
    keep_alive_timeout: float = Field(
        65.0, gt=0, description="Seconds an idle keep-alive connection is kept between requests (KServe's default, "
        "above the usual load balancers' 60 s)."
    )
    max_connections: int = Field(
        1024, ge=1, description="Open HTTP connections beyond this are answered 503 and closed at once (lowered to "
        "what the open-file limit allows)."
    )
    api_key: SecretStr | None = Field(
        None, description="If set, every route but the probes requires 'Bearer <key>'. Prefer the environment "
        "(PREDICTOR_API_KEY) or api_key_file: a command line is readable by every local user."
    )
    api_key_file: Path | None = Field(None, description="A file holding the API key (a mounted Secret).")
    enable_shutdown: bool = Field(
        False, description="Serve POST /shutdown (drain, then every rank exits 0); off since anyone who can reach "
        "the port could stop the server."
    )
    enable_model_repository: bool = Field(
        False, description="Serve KServe's POST /v2/repository/models/{name}/load and /unload (behind api_key); "
        "unload takes the model out of service (its weights stay loaded), load serves it again; off since anyone "
        "who can reach the port could take the model out of service."
    )
    shutdown_timeout: float = Field(
        DEFAULT_SHUTDOWN_TIMEOUT_S, ge=0, description="On SIGTERM, SIGINT or POST /shutdown: seconds running "
        "requests get to finish (new ones get 503) before each is ended with an error; keep it below the pod's "
        "terminationGracePeriodSeconds (the chart passes that less 15)."
    )
    log_requests: bool = Field(False, description="Log probes and /metrics too (other requests: one line each).")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line.")
    verify_weights: Literal["off", "size", "full"] = "size"
    trust_remote_code: bool = False

    # Default generation parameters, used where a request leaves them out.
    max_new_tokens: int = Field(256, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, template: str | None) -> str | None:
        if template and template not in BUILTIN_CHAT_TEMPLATES and not Path(template).is_file():
            raise ValueError(f"neither a built-in ({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a readable Jinja file")
        return template

    @field_validator("host")
    @classmethod
    def _grpc_on_every_interface(cls, host: str, info: ValidationInfo) -> str:
        if info.data.get("enable_grpc") and host != ALL_INTERFACES:
            raise ValueError(f"must be {ALL_INTERFACES} with enable_grpc: KServe's gRPC server always listens on "
                             "every interface")
        return host

    @field_validator("async_scheduling")
    @classmethod
    def _single_rank_async_scheduling(cls, on: bool, info: ValidationInfo) -> bool:
        if on and info.data.get("tensor_parallel_size", 1) > 1:
            raise ValueError("needs tensor_parallel_size 1: the other ranks would need the sampled tokens that only "
                             "the first rank holds")
        return on

    @field_validator("api_key_file")
    @classmethod
    def _readable_key_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @property
    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return None

    def generation_defaults(self) -> dict:
        """What a request leaves out of its sampling parameters."""
        return {name: getattr(self, name) for name in GENERATION_DEFAULTS}

    @property
    def serves_demo(self) -> bool:
        """No model configured: the default directory holds no model and none was asked for."""
        return "model_dir" not in self.model_fields_set and not (self.model_dir / "config.json").is_file()

    @property
    def served_model_name(self) -> str:
        return self.model_name or ("demo" if self.serves_demo else "model")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI values arrive as init kwargs (see load_settings), so they rank above env and YAML.
        yaml_file = init_settings.init_kwargs.get("config") or os.environ.get("PREDICTOR_CONFIG")
        sources = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_settings(argv: list[str]) -> Settings:
    """Parse argv, env and the optional YAML file; raise ConfigError with one line naming the setting."""
    try:
        cli = CliSettingsSource(
            Settings, cli_parse_args=argv, cli_implicit_flags=True, cli_exit_on_error=False,
            cli_prog_name="llm-predictor",
        )
    except SettingsError as err:  # unknown or malformed flags
        raise ConfigError(str(err)) from None
    cli_values = {k: v for k, v in cli().items() if v is not None}
    config_file = cli_values.get("config") or os.environ.get("PREDICTOR_CONFIG")
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"config: YAML file {config_file} does not exist")
    try:
        return Settings(**cli_values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        value = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict) else ""
        raise ConfigError(f"invalid setting {field}: {first['msg']}{value}") from None
