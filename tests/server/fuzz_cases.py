"""What the fuzz test does to each generated request before sending it.

- Every case: the model it names (body `model`, path `model_name`/`name`) is the served one, or every case would
  be a 404; generation lengths between 5 and max_model_len are cut to MAX_NEW_TOKENS, so a run stays short
  (longer ones are refused with a 400 anyway, and stay as generated).
- Schema-valid cases are also repaired towards what the server accepts beyond what OpenAPI can say (dialog
  roles alternating, one of prompt/messages, no beam search, ...), so that most of them reach the engine
  instead of a 400.
"""

from __future__ import annotations

from predictor.api.kaito.protocol import FALCON_NO_OP_ONLY
from predictor.api.openai.responses_protocol import REFUSED as RESPONSES_REFUSED

MAX_NEW_TOKENS = 4
FALCON_MAX_LENGTH = 24
LENGTH_FIELDS = {"max_tokens", "max_completion_tokens", "max_new_tokens", "max_gen_len", "min_tokens",
                 "min_new_tokens", "max_output_tokens"}
FALCON_NO_OPS = {name: no_ops[0] for name, (no_ops, _) in FALCON_NO_OP_ONLY.items()}
TOOL_CALLING = ("tools", "tool_choice", "functions", "function_call")  # documented so that they are refused by name


def served(body, model_name: str, max_model_len: int):
    """The body naming the served model, with short generations."""
    if isinstance(body, list):
        return [served(item, model_name, max_model_len) for item in body]
    if not isinstance(body, dict):
        return body
    fixed = {}
    for key, value in body.items():
        if key == "model" and isinstance(value, str):
            value = model_name
        elif key in LENGTH_FIELDS and type(value) is int and MAX_NEW_TOKENS < value <= max_model_len:
            value = MAX_NEW_TOKENS
        else:
            value = served(value, model_name, max_model_len)
        fixed[key] = value
    return fixed


def repaired(path: str, body, vocab_size: int):
    """A schema-valid body changed where the server would refuse it for a reason the schema does not give."""
    if not isinstance(body, dict):
        return body
    body = _dialogs_alternate(body)
    if path.startswith("/openai/v1/"):
        body = {key: value for key, value in body.items() if key not in TOOL_CALLING}
    if path.endswith("/responses"):  # documented so that they are refused by name
        body = {key: value for key, value in body.items() if key not in RESPONSES_REFUSED}
        if isinstance(body.get("input"), list):
            body["input"] = _alternating(body["input"])
    if path.endswith("/chat/completions") and "max_tokens" in body and "max_completion_tokens" in body:
        del body["max_completion_tokens"]
    if "stream_options" in body and body.get("stream") is not True:
        body["stream"] = True
    if path.endswith("/completions") and body.get("echo") and body.get("logprobs") is not None:
        del body["logprobs"]
    if path.endswith("/embeddings"):
        body.pop("dimensions", None)
    for key in ("prompt", "input"):  # token ids: inside the vocabulary
        if key in body:
            body[key] = _in_vocabulary(body[key], vocab_size)
    if path.startswith("/worker_generate"):
        body = _one_worker_form(body)
    if path == "/chat" and "prompt" in body:
        body = _falcon_without_beams(body)
    if path in ("/generate", "/chat"):
        _short_llama_parameters(body)
    return body


def _in_vocabulary(value, vocab_size: int):
    if isinstance(value, list):
        return [_in_vocabulary(item, vocab_size) for item in value]
    return value % vocab_size if type(value) is int else value


def _dialogs_alternate(value):
    """Roles rewritten to a dialog every template takes: user, assistant, user, ..., ending with user."""
    if isinstance(value, list):
        return [_dialogs_alternate(item) for item in value]
    if not isinstance(value, dict):
        return value
    fixed = {key: _dialogs_alternate(item) for key, item in value.items()}
    if isinstance(fixed.get("messages"), list):
        fixed["messages"] = _alternating(fixed["messages"])
    if isinstance(fixed.get("input_string"), list):  # Kaito's: a list of dialogs
        fixed["input_string"] = [_alternating(d) if isinstance(d, list) else d for d in fixed["input_string"]]
    return fixed


def _alternating(dialog: list) -> list:
    if not all(isinstance(message, dict) for message in dialog):
        return dialog
    if len(dialog) % 2 == 0:
        dialog = dialog[1:]
    return [{**m, "role": "user" if i % 2 == 0 else "assistant"} for i, m in enumerate(dialog)]


def _one_worker_form(body: dict) -> dict:
    body = {key: value for key, value in body.items()
            if key not in ("n", "best_of", "use_beam_search", "logprobs", "generation_mode")}
    if body.get("messages") is not None:
        body.pop("prompt", None)
        body["messages"] = [{"role": m["role"], "content": m.get("content") or m.get("text") or "Hi"}
                            for m in body["messages"]]
    elif body.get("prompt") is None:
        body["prompt"] = "Hello"
    if body.get("system_message") is not None and body.get("messages"):
        body.pop("system_message")
    return body


def _falcon_without_beams(body: dict) -> dict:
    body = {**body, **{name: value for name, value in FALCON_NO_OPS.items() if name in body}}
    # prompt + generated tokens: room for a short prompt and a few (left out, it would be Kaito's 200, too long)
    body["max_length"] = min(body["max_length"], FALCON_MAX_LENGTH) if isinstance(body.get("max_length"), int) \
        else FALCON_MAX_LENGTH
    return body


def _short_llama_parameters(body: dict) -> None:
    for parameters in (body.get("parameters"), (body.get("input_data") or {}).get("parameters")):
        if isinstance(parameters, dict):
            parameters.pop("max_batch_size", None)
            parameters.pop("max_seq_len", None)  # the default: max_model_len
