"""The requests a soak sends: well-formed ones on every route family, and bad ones every server must refuse.

Each kind builds its body from the client's random generator and the served model's name: a JSON object, or
raw bytes where the point is that they are not valid JSON or not valid Unicode.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

Body = dict | bytes
WORDS = ("the", "a", "river", "stone", "light", "city", "music", "quiet", "story", "once", "winter", "open",
         "road", "small", "bright", "garden", "letter", "morning", "clock", "window")
MAX_NEW_TOKENS = 24  # the soak exercises the server, not long generations
LONG_PROMPT_BYTES = 3 * 2**20  # refused by length before tokenizing (a 400), under the default max_request_bytes
OVERSIZED_BYTES = 5 * 2**20  # over the default max_request_bytes (4 MiB): a 413


@dataclass(frozen=True)
class Kind:
    name: str
    path: str  # "{model}" stands for the served name
    body: Callable[[random.Random, str], Body]
    streams: bool = False
    bad: bool = False  # a refusal (4xx) is the right answer
    weight: float = 1.0


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))


def new_tokens(rng: random.Random) -> int:
    return rng.randint(1, MAX_NEW_TOKENS)


def dialog(rng: random.Random) -> list[dict]:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": prompt(rng)}
             for i in range(rng.choice((1, 3)))]
    return ([{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []) + turns


def sampling(rng: random.Random) -> dict:
    """Greedy, or sampled with a temperature and nucleus, sometimes seeded."""
    if rng.random() < 0.5:
        return {"temperature": 0.0}
    return {"temperature": round(rng.uniform(0.1, 1.5), 2), "top_p": round(rng.uniform(0.5, 1.0), 2),
            **({"seed": rng.randrange(2**31)} if rng.random() < 0.5 else {})}


def openai_completion(stream: bool) -> Callable[[random.Random, str], Body]:
    return lambda rng, model: {"model": model, "prompt": prompt(rng), "max_tokens": new_tokens(rng),
                               "stream": stream, **sampling(rng)}


def openai_chat(stream: bool) -> Callable[[random.Random, str], Body]:
    return lambda rng, model: {"model": model, "messages": dialog(rng), "max_tokens": new_tokens(rng),
                               "stream": stream, **sampling(rng)}


def worker(rng: random.Random, model: str) -> Body:
    return {"prompt": prompt(rng), "max_new_tokens": new_tokens(rng), **sampling(rng)}


def v1_predict(rng: random.Random, model: str) -> Body:
    parameters = {"max_new_tokens": new_tokens(rng), **sampling(rng)}
    text = {"messages": dialog(rng)} if rng.random() < 0.5 else {"prompt": prompt(rng)}
    return {"instances": [{**text, "parameters": parameters}]}


def v2_infer(rng: random.Random, model: str) -> Body:
    texts = [prompt(rng) for _ in range(rng.randint(1, 2))]
    return {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
            "parameters": {"max_new_tokens": new_tokens(rng), **sampling(rng)}}


def kaito_generate(rng: random.Random, model: str) -> Body:
    return {"prompts": [prompt(rng)], "parameters": {"max_gen_len": new_tokens(rng)}}


def kaito_llama_chat(rng: random.Random, model: str) -> Body:
    return {"input_data": {"input_string": [dialog(rng)]}, "parameters": {"max_gen_len": new_tokens(rng)}}


def kaito_falcon_chat(rng: random.Random, model: str) -> Body:
    return {"prompt": prompt(rng), "max_length": 64 + new_tokens(rng), "do_sample": rng.random() < 0.5}


def openai_embeddings(rng: random.Random, model: str) -> Body:
    return {"model": model, "input": [prompt(rng) for _ in range(rng.randint(1, 3))]}


def text_embedding(rng: random.Random, model: str) -> Body:
    return {"text": prompt(rng)}


# ---- bad input: each picks one of several faults, on one of several routes --------------------------------------


def invalid_json(rng: random.Random, model: str) -> Body:
    whole = json.dumps({"model": model, "prompt": prompt(rng), "max_tokens": 4}).encode()
    return rng.choice((whole[: rng.randint(1, len(whole) - 1)], b"{'single': 'quotes'}", b"\xff\xfe\x00", b"[1,"))


def out_of_range(rng: random.Random, model: str) -> Body:
    field, value = rng.choice((("temperature", 5.0), ("top_p", 0.0), ("max_tokens", 0), ("max_tokens", 2**63),
                               ("n", 10_000), ("presence_penalty", -3.0), ("top_k", -1), ("seed", -1)))
    return {"model": model, "prompt": prompt(rng), "max_tokens": 4, field: value}


def lone_surrogate(rng: random.Random, model: str) -> Body:
    text = json.dumps(f"{prompt(rng)} ")[:-1] + '\\ud800"'  # an escaped high surrogate with no low one
    return f'{{"model": "{model}", "prompt": {text}, "max_tokens": 4}}'.encode()


def huge_prompt(rng: random.Random, model: str) -> Body:
    size = LONG_PROMPT_BYTES if rng.random() < 0.7 else OVERSIZED_BYTES
    return json.dumps({"model": model, "prompt": "word " * (size // 5), "max_tokens": 4}).encode()


def unknown_model(rng: random.Random, model: str) -> Body:
    return {"model": rng.choice(("gpt-4", f"{model}-other", "")), "prompt": prompt(rng), "max_tokens": 4}


COMPLETIONS = "/openai/v1/completions"
KINDS: tuple[Kind, ...] = (
    Kind("openai completion", COMPLETIONS, openai_completion(False), weight=2),
    Kind("openai completion stream", COMPLETIONS, openai_completion(True), streams=True, weight=2),
    Kind("openai chat", "/openai/v1/chat/completions", openai_chat(False), weight=2),
    Kind("openai chat stream", "/openai/v1/chat/completions", openai_chat(True), streams=True, weight=2),
    Kind("kserve v1 predict", "/v1/models/{model}:predict", v1_predict),
    Kind("kserve v2 infer", "/v2/models/{model}/infer", v2_infer),
    Kind("kaito generate", "/generate", kaito_generate),
    Kind("kaito llama chat", "/chat", kaito_llama_chat),
    Kind("kaito falcon chat", "/chat", kaito_falcon_chat),
    Kind("worker generate", "/worker_generate", worker),
    Kind("worker generate stream", "/worker_generate_stream", worker, streams=True),
    Kind("openai embeddings", "/openai/v1/embeddings", openai_embeddings),
    Kind("embeddings (llm-api)", "/embeddings", text_embedding),
    Kind("bad: invalid JSON", COMPLETIONS, invalid_json, bad=True),
    Kind("bad: out-of-range value", COMPLETIONS, out_of_range, bad=True),
    Kind("bad: lone surrogate", COMPLETIONS, lone_surrogate, bad=True),
    Kind("bad: huge prompt", COMPLETIONS, huge_prompt, bad=True, weight=0.2),
    Kind("bad: unknown model", COMPLETIONS, unknown_model, bad=True),
    Kind("bad: unknown model (V1)", "/v1/models/{model}-other:predict", v1_predict, bad=True),
)
