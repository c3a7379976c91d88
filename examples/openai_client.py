"""Talk to a deployed llm-predictor with the official OpenAI client (`pip install openai`).

    BASE=http://localhost:8080 MODEL=llama-2-7b-chat API_KEY=... python examples/openai_client.py

BASE is where the predictor answers (e.g. after `kubectl port-forward service/<release>-llm-predictor-predictor
8080:80`); the OpenAI routes live under /openai/v1. API_KEY is only needed when the release sets apiKey; the
client insists on some key, so any placeholder works otherwise.
"""

from __future__ import annotations

import json
import os
import urllib.request

from openai import OpenAI


def served_model(base: str, api_key: str | None) -> str:
    """The first model KServe lists on GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/models", headers=headers), timeout=30) as response:
        return json.load(response)["models"][0]


def main() -> None:
    base = os.environ.get("BASE", "http://localhost:8080").rstrip("/")
    api_key = os.environ.get("API_KEY")
    client = OpenAI(base_url=f"{base}/openai/v1", api_key=api_key or "unused")
    model = os.environ.get("MODEL") or served_model(base, api_key)

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=32,
                                           temperature=0)
    print("completion:", completion.choices[0].text)

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=32)
    print("chat:", chat.choices[0].message.content)
    print("usage:", chat.usage)


if __name__ == "__main__":
    main()
