#!/usr/bin/env bash
# Example requests against a deployed llm-predictor (or `make run` locally).
#
#   BASE      where the predictor answers (default http://localhost:8080, e.g. after
#             kubectl port-forward service/<release>-llm-predictor-predictor 8080:80)
#   MODEL     the served model name (default: the first model listed by the server)
#   API_KEY   set when the release has apiKey.value / apiKey.existingSecret
#
#   BASE=http://localhost:8080 MODEL=llama-2-7b-chat examples/requests.sh
set -euo pipefail

BASE=${BASE:-http://localhost:8080}
BASE=${BASE%/}
auth=()
if [[ -n "${API_KEY:-}" ]]; then auth=(-H "Authorization: Bearer $API_KEY"); fi
if [[ -z "${MODEL:-}" ]]; then
  MODEL=$(curl -fsS "${auth[@]}" "$BASE/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["models"][0])')
fi

post() {  # post PATH JSON
  echo "### POST $1" >&2
  curl -fsS "$BASE$1" -H 'Content-Type: application/json' "${auth[@]}" -d "$2"
  echo
}

echo "### GET /v1/models/$MODEL (200 once loaded, 503 while loading)" >&2
curl -fsS "$BASE/v1/models/$MODEL"
echo

# KServe V1 protocol: a completion, then a chat (the model's chat template formats the messages).
post "/v1/models/$MODEL:predict" \
  '{"instances":[{"prompt":"The capital of France is","parameters":{"max_new_tokens":32}}]}'
post "/v1/models/$MODEL:predict" \
  '{"instances":[{"messages":[{"role":"user","content":"hi"}]}]}'

# OpenAI protocol.
post /openai/v1/completions \
  "{\"model\":\"$MODEL\",\"prompt\":\"The capital of France is\",\"max_tokens\":32,\"temperature\":0}"
post /openai/v1/chat/completions \
  "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":32}"
