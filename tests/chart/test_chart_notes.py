"""NOTES.txt and the `helm test` pod."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import chart_helpers as ch
import yaml
from chart_helpers import BASE, container_of, isvc_of

pytestmark = ch.needs_helm

# ------------------------------------------------------------------------------------------------
# NOTES.txt, helm test
# ------------------------------------------------------------------------------------------------

def test_notes_tell_how_to_reach_and_scale():
    notes = ch.install_notes(BASE, overrides={"apiKey": {"value": "k"}}, release="chat")
    assert "kubectl -n llm port-forward service/chat-llm-predictor-predictor 8080:80" in notes
    assert "$BASE/v1/models/llama-2-7b-chat:predict" in notes
    assert '"instances":[{"messages":[{"role":"user","content":"hi"}]}]' in notes
    assert "$BASE/openai/v1/chat/completions" in notes and "$BASE/openai/v1/completions" in notes
    assert 'base_url="$BASE/openai/v1"' in notes
    assert '-H "Authorization: Bearer $API_KEY"' in notes
    assert "`kubectl scale` does not work" in notes
    assert "make scale NAME=chat-llm-predictor REPLICAS=3 NAMESPACE=llm" in notes
    assert "--reuse-values --set minReplicas=3,maxReplicas=3" in notes
    assert '{"spec":{"predictor":{"minReplicas":3,"maxReplicas":3}}}' in notes


def test_notes_multinode_and_knative():
    notes = ch.install_notes("examples/llama-2-70b-2node.yaml")
    assert "multi-node" in notes and "do not scale" in notes
    notes = ch.install_notes(BASE, overrides={"deploymentMode": "Knative"})
    assert "jsonpath='{.status.url}'" in notes


def test_notes_describe_the_kv_cache():
    notes = ch.install_notes(BASE)
    assert "KV cache: sized by the predictor at start, as vLLM does: model.gpuMemoryUtilization 0.9 of" in notes
    assert "at most\n9.0 GiB per GPU (about 18531 tokens)" in notes  # (0.9 * 24 GiB - 12.55 GiB) / 512 KiB a token
    assert "The install check counted 4 sequences x 4096 tokens (8.0 GiB per GPU)." in notes
    notes = ch.install_notes(BASE, overrides={"model": {"kvCacheBytes": 4 * 2**30}})
    assert "KV cache: model.kvCacheBytes, 4.0 GiB per GPU (--kv_cache_bytes), room for 8192 tokens." in notes
    assert "KV cache: the predictor's default size on CPU" in ch.install_notes("examples/demo-cpu.yaml")


def test_helm_test_pod_waits_for_readiness_then_completes():
    objects = ch.template(BASE)
    pod = ch.one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BASE_URL"] == "http://t-llm-predictor-predictor.llm.svc"
    assert env["MODEL_NAME"] == "llama-2-7b-chat"
    body = json.loads(env["REQUEST_BODY"])
    assert body["model"] == "llama-2-7b-chat" and body["max_tokens"] == 8
    script = container["args"][0]
    assert '"{base}/v1/models/{name}"' in script and "/openai/v1/completions" in script
    assert pod["spec"]["restartPolicy"] == "Never"


def test_helm_test_pod_runs_the_predictor_image_with_its_pull_secrets():
    """No other registry: the model image's python3 (there is no curl in it), pulled with the release's secrets,
    on the node of a predictor pod where that image already is."""
    objects = ch.template(BASE, overrides={"pullSecret": {"server": "registry.example.com", "username": "robot",
                                                          "password": "s3cret"}})
    pod, predictor = ch.one(objects, "Pod"), isvc_of(objects)["spec"]["predictor"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == container_of(objects)["image"] == "registry.example.com/llm/llama-2-7b-chat:0.1.0"
    assert container["imagePullPolicy"] == container_of(objects)["imagePullPolicy"]
    assert container["command"] == ["python3", "-c"] and "curl" not in yaml.safe_dump(pod)
    assert pod["spec"]["imagePullSecrets"] == predictor["imagePullSecrets"] == [
        {"name": "regcred"}, {"name": "t-llm-predictor-pull-secret"}]
    assert pod["spec"]["tolerations"] == predictor["tolerations"]
    term = pod["spec"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    pod_labels = {**isvc_of(objects)["metadata"]["labels"], **predictor["labels"]}
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "imagePullSecrets" not in ch.one(ch.template("examples/demo-cpu.yaml"), "Pod")["spec"]
    other = ch.one(ch.template(BASE, overrides={"test": {"image": "python:3.12-slim"}}), "Pod")
    assert other["spec"]["containers"][0]["image"] == "python:3.12-slim"


class _StubPredictor(http.server.BaseHTTPRequestHandler):
    """Answers like the predictor: 503 on the readiness route twice, then 200; completions need the key."""

    readiness_calls = 0
    completion_headers: list[str | None] = []

    def do_GET(self):  # noqa: N802
        cls = type(self)
        cls.readiness_calls += 1
        ready = self.path == "/v1/models/llama-2-7b-chat" and cls.readiness_calls > 2
        self._reply(200 if ready else 503, {"name": "llama-2-7b-chat", "ready": ready})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).completion_headers.append(self.headers.get("Authorization"))
        if self.path != "/openai/v1/completions" or self.headers.get("Authorization") != "Bearer k3y":
            return self._reply(401, {"error": {"message": "missing or wrong API key"}})
        self._reply(200, {"object": "text_completion", "model": body["model"], "choices": [{"text": " Paris"}]})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _run_test_pod(container, **env_overrides) -> subprocess.CompletedProcess:
    """The test pod's command, run here with this interpreter in place of the image's python3."""
    assert container["command"][0] == "python3"
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(POLL_SECONDS="0.1", PATH=os.environ["PATH"], **env_overrides)
    return subprocess.run([sys.executable, *container["command"][1:], *container["args"]], env=env,
                          capture_output=True, text=True, timeout=60)


def test_helm_test_script_against_a_stub_predictor():
    pod = ch.one(ch.template(BASE, overrides={"apiKey": {"value": "k3y"}}), "Pod")
    container = pod["spec"]["containers"][0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubPredictor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        run = _run_test_pod(container, BASE_URL=base, PREDICTOR_API_KEY="k3y")
        assert run.returncode == 0, run.stderr
        assert "completion OK" in run.stdout and _StubPredictor.readiness_calls == 3
        run = _run_test_pod(container, BASE_URL=base, PREDICTOR_API_KEY="wrong")
        assert run.returncode != 0 and "completion failed: HTTP 401" in run.stderr
        assert _StubPredictor.completion_headers == ["Bearer k3y", "Bearer wrong"]
        run = _run_test_pod(container, BASE_URL=base, MODEL_NAME="other", TIMEOUT_SECONDS="0.3")
        assert run.returncode != 0 and f"model other not ready at {base} after 0s" in run.stderr
    finally:
        server.shutdown()
        server.server_close()
