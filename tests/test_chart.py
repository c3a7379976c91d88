"""The Helm chart (charts/llm-predictor) and its examples: lint, render, SDK round trip, Kubernetes schema
validation, the install-time sizing and schema failures, pull-secret modes, security context, multi-node."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chart_helpers as ch  # noqa: E402

pytestmark = pytest.mark.skipif(
    ch.find_helm() is None,
    reason="helm not found: set HELM, put helm on PATH, or run `make tools` (installs it into .tools/bin)",
)

EXAMPLE_FILES = sorted(p.relative_to(ch.REPO).as_posix() for p in ch.EXAMPLES.glob("*.yaml"))
EXPECTED_EXAMPLES = {
    "examples/llama-2-7b-chat.yaml": (1, 1),  # (tensor parallel size, GPUs per pod)
    "examples/llama-2-13b.yaml": (2, 2),
    "examples/llama-2-70b.yaml": (8, 8),
    "examples/llama-2-70b-2node.yaml": (8, 4),
    "examples/falcon-7b-instruct.yaml": (1, 1),
    "examples/mistral-7b-instruct.yaml": (1, 1),
    "examples/demo-cpu.yaml": (1, 0),
}
K8S_VERSION = "1.35"
CATALOG = yaml.safe_load((ch.REPO / "predictor" / "tools" / "catalog.yaml").read_text())["models"]
# Small base for failure cases: a 7B chat model on one 80 GiB GPU.
BASE = "examples/llama-2-7b-chat.yaml"


def isvc_of(objects):
    return ch.one(objects, "InferenceService")


def container_of(objects):
    containers = isvc_of(objects)["spec"]["predictor"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"]
    return containers[0]


def args_of(container) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in container["args"] if arg.startswith("--") and "=" in arg)


def pod_specs(objects) -> list[tuple[str, dict]]:
    """Every pod spec the chart renders: the predictor, the multi-node workers, the helm test pod."""
    specs = [("InferenceService", isvc_of(objects)["spec"]["predictor"])]
    specs += [("StatefulSet", s["spec"]["template"]["spec"]) for s in ch.by_kind(objects, "StatefulSet")]
    specs += [("Pod", p["spec"]) for p in ch.by_kind(objects, "Pod")]
    return specs


# ------------------------------------------------------------------------------------------------
# Chart packaging and lint
# ------------------------------------------------------------------------------------------------

def test_examples_are_the_documented_set():
    assert set(EXAMPLE_FILES) == set(EXPECTED_EXAMPLES)


def test_catalog_is_the_image_builds_catalog(tmp_path):
    link = ch.CHART / "catalog.yaml"
    catalog = ch.REPO / "predictor" / "tools" / "catalog.yaml"
    assert link.resolve() == catalog.resolve(), "catalog.yaml must link to predictor/tools/"
    packaged = ch.package(tmp_path)
    with tarfile.open(packaged) as tar:
        member = tar.extractfile("llm-predictor/catalog.yaml")
        assert member is not None
        assert member.read() == (ch.REPO / "predictor" / "tools" / "catalog.yaml").read_bytes()


@pytest.mark.parametrize("values", EXAMPLE_FILES)
def test_lint(values):
    out = ch.lint(values)
    assert "0 chart(s) failed" in out


def test_lint_without_image_fails_on_the_schema():
    with pytest.raises(ch.HelmError, match="image/repository"):
        ch.lint()


# ------------------------------------------------------------------------------------------------
# Every example: rendered, round-tripped, validated, restricted, sized
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", EXAMPLE_FILES)
def test_example_renders_a_sized_inferenceservice(values):
    objects = ch.template(values)
    example = yaml.safe_load((ch.REPO / values).read_text())
    isvc = isvc_of(objects)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    predictor = isvc["spec"]["predictor"]
    container = container_of(objects)
    repo = example["image"]["repository"]
    assert container["image"] == f"{repo}:{example['image']['tag']}"

    tp, gpus = EXPECTED_EXAMPLES[values]
    args = args_of(container)
    catalog_name = example["model"]["catalogName"]
    assert args["model_name"] == catalog_name
    assert args["tensor_parallel_size"] == str(tp)
    assert args["model_dir"] == "/mnt/models" and args["http_port"] == "8080"
    entry = CATALOG[catalog_name]
    assert entry["num_attention_heads"] % tp == 0 and entry["num_key_value_heads"] % tp == 0
    kv = int(args["kv_cache_bytes"])
    expected_len = example["model"].get("maxModelLen") or entry["max_context"]
    sequences = example.get("sizing", {}).get("kvSequences", 4)
    assert kv == -(-entry["kv_bytes_per_token"] * expected_len * sequences // tp)
    if entry["chat_template"]:
        assert args["chat_template"] == entry["chat_template"]

    resources = container["resources"]
    if gpus:
        assert resources["limits"]["nvidia.com/gpu"] == str(gpus)
        assert resources["requests"]["nvidia.com/gpu"] == str(gpus)
        per_gpu = 1.10 * (entry["weight_bytes"] / tp + kv)
        assert per_gpu <= example["gpu"]["memoryGiB"] * 2**30
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        assert args["device"] == "cpu" and args["dtype"] == "float32"

    # Probes on the model's readiness route, never on /v2/health/ready (200 before the model loads).
    path = f"/v1/models/{catalog_name}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": path, "port": 8080}
    assert "/v2/health/ready" not in yaml.safe_dump_all(objects)
    startup = container["startupProbe"]
    allowance = startup["failureThreshold"] * startup["periodSeconds"]
    startup_values = example.get("probes", {}).get("startup", {})
    load_rate = startup_values.get("loadBytesPerSecond", 200 * 2**20)
    nodes = tp // gpus if gpus else 1
    assert allowance >= startup_values.get("baseSeconds", 120) + entry["weight_bytes"] / nodes / load_rate

    # /dev/shm for NCCL, writable /tmp and HOME, Prometheus scraping on 8080.
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/home/predictor"} <= mounts
    assert {"name": "HOME", "value": "/home/predictor"} in container["env"]
    assert predictor["annotations"]["prometheus.io/port"] == "8080"
    assert predictor["annotations"]["prometheus.io/path"] == "/metrics"
    if not values.endswith("demo-cpu.yaml"):
        assert predictor["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize("values", EXAMPLE_FILES)
def test_example_security_context_is_restricted(values):
    for kind, spec in pod_specs(ch.template(values)):
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, kind
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert spec["automountServiceAccountToken"] is False, kind
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, kind
            assert sc["readOnlyRootFilesystem"] is True, kind
            assert sc["allowPrivilegeEscalation"] is False, kind
            assert sc["capabilities"]["drop"] == ["ALL"], kind
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, kind


@pytest.mark.parametrize("values", EXAMPLE_FILES)
def test_example_inferenceservice_round_trips_through_kserve_sdk(values):
    pytest.importorskip("kserve", reason="the kserve SDK is a project dependency: `make install`")
    isvc = isvc_of(ch.template(values))
    model = ch.sdk_deserialize(isvc, "V1beta1InferenceService")
    assert type(model).__name__ == "V1beta1InferenceService"
    assert ch.differences(isvc, ch.sdk_serialize(model)) == []


def test_round_trip_detects_lost_fields():
    pytest.importorskip("kserve")
    isvc = isvc_of(ch.template(BASE))
    isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["notAField"] = 1
    back = ch.sdk_serialize(ch.sdk_deserialize(isvc, "V1beta1InferenceService"))
    assert ch.differences(isvc, back) == [".spec.predictor.containers[0].readinessProbe.notAField: lost"]


@pytest.mark.parametrize("values", EXAMPLE_FILES)
def test_example_core_objects_validate(values):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the test extras: `make install`")
    objects = ch.template(values)
    checked = []
    for obj in objects:
        if obj["kind"] in ("InferenceService", "ScaledObject"):
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked.append(obj["kind"])
    # The predictor's pod-spec part of the InferenceService, as a Pod.
    kubernetes_validate.validate(ch.predictor_pod(isvc_of(objects)), K8S_VERSION, strict=True)
    assert "Pod" in checked  # the helm test pod
    assert "ServiceAccount" in checked


# ------------------------------------------------------------------------------------------------
# Install-time failures: sizing, consistency, schema
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": {"catalogName": "falcon-7b-instruct", "tensorParallelSize": 2}},
     "tensor parallel size 2 does not divide the 71 attention heads and 1 KV heads of falcon-7b-instruct"),
    ({"model": {"catalogName": "llama-2-13b", "tensorParallelSize": 3}},
     "valid tensor parallel sizes: 1, 2, 4, 5, 8, 10, 20, 40"),
    ({"model": {"catalogName": "llama-2-70b", "tensorParallelSize": 2}, "gpu": {"memoryGiB": 40}},
     "llama-2-70b does not fit: each of the 2 GPUs needs 73.4 GiB"),
    ({"model": {"catalogName": "mistral-7b-instruct", "tensorParallelSize": 1}, "gpu": {"memoryGiB": 24}},
     "KV cache 16.0 GiB for 4 sequences x 32768 tokens"),
    ({"model": {"catalogName": "llama-2-7b-chat", "dtype": "float32"}, "gpu": {"memoryGiB": 24}},
     "weights 25.1 GiB"),
    ({"model": {"catalogName": "llama-2-70b", "tensorParallelSize": 8}, "gpu": {"memoryGiB": 80, "perNode": 4}},
     "tensor parallel size 8 needs 8 GPUs in one pod but gpu.perNode is 4: use multiNode.enabled=true "
     "with multiNode.nodes=2"),
    ({"model": {"catalogName": "llama-2-70b", "tensorParallelSize": 8}, "multiNode": {"enabled": True, "nodes": 3}},
     "model.tensorParallelSize 8 cannot be split evenly over multiNode.nodes=3"),
    ({"model": {"catalogName": "llama-2-70b", "tensorParallelSize": 8}, "multiNode": {"enabled": True},
      "maxReplicas": 2}, "multiNode serves exactly one copy of the model"),
    ({"multiNode": {"enabled": True}, "deploymentMode": "Knative"}, "multiNode needs deploymentMode Standard"),
    ({"model": {"catalogName": "gpt-5"}}, 'model.catalogName "gpt-5" is not in the chart\'s catalog.yaml'),
    ({"model": {"catalogName": ""}}, "model.custom.numAttentionHeads is required for the GPU sizing check"),
    ({"model": {"maxModelLen": 8192}}, "model.maxModelLen 8192 is longer than the 4096-token context"),
    ({"minReplicas": 3, "maxReplicas": 2}, "maxReplicas (2) must be at least minReplicas (3)"),
    ({"minReplicas": 0, "maxReplicas": 2, "autoscaling": {"class": "hpa"}},
     "minReplicas 0 (scale to zero) needs deploymentMode Knative or autoscaling.class keda"),
    ({"minReplicas": 1, "maxReplicas": 3}, "autoscaling.class none runs a fixed number of replicas"),
    ({"deploymentMode": "Knative", "autoscaling": {"class": "keda"}}, "autoscaling.class keda is for deploymentMode"),
])
def test_misconfiguration_fails_with_a_clear_message(overrides, message):
    error = ch.template_error(BASE, overrides=overrides)
    assert message in error


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_sizing_agrees_with_the_catalog(name):
    """At the catalog's default TP and the default KV budget, a GPU needs the catalog's gpu_memory_bytes / tp:
    the chart passes with 0.1% more memory and fails with 0.1% less."""
    entry = CATALOG[name]
    tp = entry["default_tensor_parallel_size"]
    need_gib = entry["gpu_memory_bytes"] / tp / 2**30
    overrides = {"model": {"catalogName": name, "tensorParallelSize": tp}, "gpu": {"perNode": 8}}
    overrides["gpu"]["memoryGiB"] = round(need_gib * 1.001, 4)
    args = args_of(container_of(ch.template(BASE, overrides=overrides)))
    assert args["tensor_parallel_size"] == str(tp)
    overrides["gpu"]["memoryGiB"] = round(need_gib * 0.999, 4)
    assert f"{name} does not fit" in ch.template_error(BASE, overrides=overrides)


def test_sizing_message_names_the_numbers():
    error = ch.template_error(BASE, overrides={"model": {"catalogName": "llama-2-13b", "tensorParallelSize": 1},
                                               "gpu": {"memoryGiB": 24}})
    assert "templates/validate/plan.yaml" in error
    assert ("llama-2-13b does not fit: each of the 1 GPUs needs 40.4 GiB (weights 24.2 GiB / 1 GPUs + KV cache "
            "12.5 GiB for 4 sequences x 4096 tokens over 1 GPUs, plus 10% overhead) but gpu.memoryGiB is 24. "
            "Raise model.tensorParallelSize (valid: 1, 2, 4, 5, 8, 10, 20, 40)") in error


@pytest.mark.parametrize(("overrides", "message"), [
    ({"minReplicas": -1}, "at '/minReplicas': minimum: got -1, want 0"),
    ({"maxReplicas": 0}, "at '/maxReplicas': minimum: got 0, want 1"),
    ({"model": {"dtype": "fp8"}}, "at '/model/dtype': value must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
    ({"model": {"device": "tpu"}}, "at '/model/device'"),
    ({"image": {"repository": ""}}, "at '/image/repository': minLength: got 0, want 1"),
    ({"deploymentMode": "RawDeployment"}, "at '/deploymentMode': value must be one of 'Standard', 'Knative'"),
    ({"autoscaling": {"class": "kpa"}}, "at '/autoscaling/class'"),
    ({"model": {"tensorParallelSize": -2}}, "at '/model/tensorParallelSize'"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"gpu": {"memoryGiB": 0}}, "at '/gpu/memoryGiB'"),
])
def test_schema_rejects_bad_values(overrides, message):
    error = ch.template_error(BASE, overrides=overrides)
    assert "values don't meet the specifications of the schema" in error
    assert message in error


def test_missing_image_fails_without_any_values_file():
    error = ch.template_error(overrides={"model": {"catalogName": "demo"}, "gpu": {"enabled": False}})
    assert "at '/image/repository': minLength: got 0, want 1" in error


# ------------------------------------------------------------------------------------------------
# Image pull secrets
# ------------------------------------------------------------------------------------------------

def _pull_secret_names(objects):
    return [s["name"] for s in isvc_of(objects)["spec"]["predictor"].get("imagePullSecrets", [])]


def test_pull_secret_existing_names():
    objects = ch.template(BASE, overrides={"pullSecret": {"existing": ["regcred", "mirror"]}})
    assert _pull_secret_names(objects) == ["regcred", "mirror"]
    assert ch.by_kind(objects, "Secret") == []
    assert ch.one(objects, "ServiceAccount")["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]


def test_pull_secret_from_registry_credentials():
    objects = ch.template(BASE, overrides={"pullSecret": {
        "existing": ["regcred"], "server": "registry.example.com", "username": "robot", "password": "s3cret",
        "email": "ops@example.com"}})
    secret = ch.one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert secret["metadata"]["name"] == "t-llm-predictor-pull-secret"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    entry = config["auths"]["registry.example.com"]
    assert base64.b64decode(entry["auth"]).decode() == "robot:s3cret"
    assert entry["username"] == "robot" and entry["password"] == "s3cret" and entry["email"] == "ops@example.com"
    assert _pull_secret_names(objects) == ["regcred", "t-llm-predictor-pull-secret"]


def test_pull_secret_from_dockerconfigjson():
    doc = json.dumps({"auths": {"ghcr.io": {"auth": base64.b64encode(b"u:p").decode()}}})
    objects = ch.template(BASE, overrides={"pullSecret": {"existing": [], "dockerConfigJson": doc, "name": "ghcr"}})
    secret = ch.one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert base64.b64decode(secret["data"][".dockerconfigjson"]).decode() == doc
    assert _pull_secret_names(objects) == ["ghcr"]


@pytest.mark.parametrize(("pull_secret", "message"), [
    ({"server": "registry.example.com", "username": "robot"},
     "registry credentials need all of pullSecret.server, pullSecret.username and pullSecret.password"),
    ({"server": "https://registry.example.com", "username": "u", "password": "p"},
     "pullSecret.server must be a registry host"),
    ({"server": "r.example.com", "username": "u", "password": "p", "dockerConfigJson": '{"auths":{}}'},
     "give either registry credentials (server, username, password) or dockerConfigJson, not both"),
    ({"dockerConfigJson": "not json"}, 'pullSecret.dockerConfigJson must be a JSON document with an "auths" object'),
])
def test_pull_secret_misconfiguration(pull_secret, message):
    assert message in ch.template_error(BASE, overrides={"pullSecret": pull_secret})


def test_no_pull_secret_at_all():
    objects = ch.template("examples/demo-cpu.yaml")
    assert "imagePullSecrets" not in isvc_of(objects)["spec"]["predictor"]


# ------------------------------------------------------------------------------------------------
# API key, autoscaling, deployment modes
# ------------------------------------------------------------------------------------------------

def test_api_key_from_value_creates_a_secret():
    objects = ch.template(BASE, overrides={"apiKey": {"value": "k3y"}})
    secret = ch.one(objects, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "k3y"
    env = {e["name"]: e for e in container_of(objects)["env"]}
    assert env["PREDICTOR_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                      "key": "api-key"}
    test_pod = ch.one(objects, "Pod")
    assert "PREDICTOR_API_KEY" in {e["name"] for e in test_pod["spec"]["containers"][0]["env"]}


def test_api_key_from_existing_secret():
    objects = ch.template("examples/mistral-7b-instruct.yaml")
    assert ch.by_kind(objects, "Secret") == []
    env = {e["name"]: e for e in container_of(objects)["env"]}
    assert env["PREDICTOR_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mistral-api-key"


def test_no_api_key_by_default():
    env = {e["name"] for e in container_of(ch.template(BASE))["env"]}
    assert "PREDICTOR_API_KEY" not in env


def test_autoscaling_none_pins_replicas():
    isvc = isvc_of(ch.template(BASE, overrides={"minReplicas": 3, "maxReplicas": 3}))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "none"
    assert (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"]) == (3, 3)


def test_autoscaling_hpa():
    objects = ch.template(BASE, overrides={"maxReplicas": 4, "autoscaling": {"class": "hpa",
                                                                           "hpa": {"metric": "memory", "target": 70}}})
    predictor = isvc_of(objects)["spec"]["predictor"]
    assert isvc_of(objects)["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (predictor["scaleMetric"], predictor["scaleTarget"], predictor["maxReplicas"]) == ("memory", 70, 4)
    assert ch.by_kind(objects, "ScaledObject") == []


def test_autoscaling_keda_scales_the_predictor_deployment_on_waiting_requests():
    objects = ch.template("examples/mistral-7b-instruct.yaml")
    isvc = isvc_of(objects)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    scaled = ch.one(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": "t-llm-predictor-predictor"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 4)
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"].startswith("sum(predictor_num_requests_waiting{")
    assert 'pod=~"t-llm-predictor-predictor-.*"' in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == "8"


def test_knative_mode():
    objects = ch.template(BASE, overrides={"deploymentMode": "Knative", "minReplicas": 0, "maxReplicas": 3,
                                           "autoscaling": {"knative": {"targetConcurrency": 4}}})
    isvc = isvc_of(objects)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert "serving.kserve.io/autoscalerClass" not in isvc["metadata"]["annotations"]
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["scaleMetric"], predictor["scaleTarget"]) == (0, "concurrency", 4)
    assert [p["name"] for p in predictor["containers"][0]["ports"]] == ["http1"]


def test_scheduling_labels_and_annotations_pass_through():
    overrides = {"labels": {"team": "ml"}, "annotations": {"owner": "ml"}, "podLabels": {"tier": "gpu"},
                 "podAnnotations": {"sidecar.istio.io/inject": "false"}, "priorityClassName": "inference",
                 "serviceAccount": {"create": False, "name": "llm-runner"}, "timeoutSeconds": 300,
                 "model": {"extraArgs": ["--max_new_tokens=128"], "maxNumSeqs": 16, "maxQueue": 64}}
    objects = ch.template(BASE, overrides=overrides)
    isvc = isvc_of(objects)
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["labels"]["team"] == "ml" and isvc["metadata"]["annotations"]["owner"] == "ml"
    assert predictor["labels"]["tier"] == "gpu"
    assert predictor["annotations"]["sidecar.istio.io/inject"] == "false"
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert predictor["priorityClassName"] == "inference"
    assert predictor["serviceAccountName"] == "llm-runner"
    assert ch.by_kind(objects, "ServiceAccount") == []
    assert predictor["timeout"] == 300
    container = predictor["containers"][0]
    assert container["args"][-1] == "--max_new_tokens=128"
    assert args_of(container)["max_num_seqs"] == "16" and args_of(container)["max_queue"] == "64"


def test_image_digest_wins_over_tag():
    digest = "sha256:" + "ab" * 32
    container = container_of(ch.template(BASE, overrides={"image": {"digest": digest}}))
    assert container["image"] == f"registry.example.com/llm/llama-2-7b-chat@{digest}"


def test_custom_model_outside_the_catalog():
    custom = {"numAttentionHeads": 32, "numKeyValueHeads": 8, "weightBytes": 16_060_522_496,
              "kvBytesPerToken": 131072, "maxContext": 8192, "dtype": "bfloat16"}
    objects = ch.template(BASE, overrides={"model": {"catalogName": "", "name": "my-llm", "chatTemplate": "chatml",
                                                     "tensorParallelSize": 2, "custom": custom}})
    args = args_of(container_of(objects))
    assert args["model_name"] == "my-llm" and args["chat_template"] == "chatml"
    assert args["kv_cache_bytes"] == str(131072 * 8192 * 4 // 2)
    assert "tensor parallel size 3 does not divide the 32 attention heads" in ch.template_error(
        BASE, overrides={"model": {"catalogName": "", "tensorParallelSize": 3, "custom": custom}})


def test_sizing_can_be_skipped_for_a_custom_model():
    objects = ch.template(BASE, overrides={"model": {"catalogName": "", "name": "mystery", "tensorParallelSize": 2},
                                           "sizing": {"enabled": False}})
    args = args_of(container_of(objects))
    assert args["tensor_parallel_size"] == "2" and "kv_cache_bytes" not in args
    assert container_of(objects)["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_startup_allowance_grows_with_the_weights():
    small = container_of(ch.template(BASE))["startupProbe"]["failureThreshold"]
    big = container_of(ch.template(BASE, overrides={"model": {"catalogName": "llama-2-70b", "tensorParallelSize": 8},
                                                    "gpu": {"perNode": 8}}))["startupProbe"]["failureThreshold"]
    full = container_of(ch.template(BASE, overrides={"model": {"verifyWeights": "full"}}))["startupProbe"]
    assert big > 3 * small and full["failureThreshold"] > small
    fixed = container_of(ch.template(BASE, overrides={"probes": {"startup": {"failureThreshold": 500}}}))
    assert fixed["startupProbe"]["failureThreshold"] == 500


# ------------------------------------------------------------------------------------------------
# Multi-node
# ------------------------------------------------------------------------------------------------

def test_multinode_head_workers_and_rendezvous():
    objects = ch.template("examples/llama-2-70b-2node.yaml")
    isvc = isvc_of(objects)
    predictor = isvc["spec"]["predictor"]
    head = container_of(objects)
    assert predictor["deploymentStrategy"] == {"type": "Recreate"}
    assert predictor["labels"]["llm-predictor/role"] == "head"
    assert head["command"] == ["torchrun"]
    rdzv = "--rdzv_endpoint=t-llm-predictor-head.llm.svc:29500"
    assert head["args"][:8] == ["--node_rank=0", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=static", rdzv,
                                "--rdzv_conf=timeout=1800", "--max_restarts=0", "-m"]
    assert head["args"][8] == "predictor"
    assert args_of(head)["tensor_parallel_size"] == "8"

    services = {s["metadata"]["name"]: s for s in ch.by_kind(objects, "Service")}
    head_svc = services["t-llm-predictor-head"]
    assert head_svc["spec"]["clusterIP"] == "None" and head_svc["spec"]["publishNotReadyAddresses"] is True
    assert head_svc["spec"]["ports"][0]["port"] == 29500
    pod_labels = {**isvc["metadata"]["labels"], **predictor["labels"]}
    assert head_svc["spec"]["selector"].items() <= pod_labels.items()

    workers = ch.one(objects, "StatefulSet")
    spec = workers["spec"]
    assert spec["replicas"] == 1 and spec["ordinals"] == {"start": 1}
    assert spec["serviceName"] in services and spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert not head_svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    worker = spec["template"]["spec"]["containers"][0]
    assert worker["command"] == ["torchrun"]
    assert worker["args"] == head["args"][1:]  # the same, less the explicit node rank 0
    env = {e["name"]: e for e in worker["env"]}
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
    assert worker["resources"] == head["resources"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "startupProbe" not in worker  # only rank 0 serves HTTP


def test_multinode_three_nodes():
    objects = ch.template("examples/llama-2-70b-2node.yaml", overrides={
        "model": {"catalogName": "falcon-40b", "tensorParallelSize": 8}, "gpu": {"perNode": 4},
        "multiNode": {"nodes": 4}})
    assert ch.one(objects, "StatefulSet")["spec"]["replicas"] == 3
    assert "--nproc_per_node=2" in container_of(objects)["args"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (project dependency)")
def test_multinode_commands_run_the_predictor_across_two_nodes(tmp_path):
    """The head's and the worker's rendered commands, run as two local "nodes" on CPU (gloo): they
    rendezvous, shard the demo model over 2 ranks, and the head's rank 0 answers a completion."""
    objects = ch.template("examples/llama-2-70b-2node.yaml", overrides={
        "model": {"catalogName": "demo", "tensorParallelSize": 2, "kvCacheBytes": 64 * 2**20},
        "gpu": {"perNode": 1}})
    head = container_of(objects)
    worker = ch.one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    http_port, rdzv_port = _free_port(), _free_port()

    def local(container) -> list[str]:
        assert container["command"] == ["torchrun"]
        args = []
        for arg in container["args"]:
            if arg.startswith("--model_dir="):
                continue  # no weights at /mnt/models here: the predictor serves its demo model
            arg = {"--device=auto": "--device=cpu", "--http_port=8080": f"--http_port={http_port}"}.get(arg, arg)
            if arg.startswith("--rdzv_endpoint="):
                arg = f"--rdzv_endpoint=127.0.0.1:{rdzv_port}"
            args.append(arg)
        return [sys.executable, "-m", "torch.distributed.run", *args]

    env = {**os.environ, "PYTHONPATH": str(ch.REPO), "LOG_LEVEL": "WARNING"}
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    procs = [subprocess.Popen(local(head), env=env, cwd=ch.REPO, stdout=logs[0].open("w"), stderr=subprocess.STDOUT),
             subprocess.Popen(local(worker), env={**env, "PET_NODE_RANK": "1"}, cwd=ch.REPO,
                              stdout=logs[1].open("w"), stderr=subprocess.STDOUT)]
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(p.poll() is None for p in procs), "a node exited:\n" + "\n".join(
                log.read_text()[-2000:] for log in logs)
            try:
                with urllib.request.urlopen(f"{base}/v1/models/demo", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "head never became ready:\n" + logs[0].read_text()[-2000:]
            time.sleep(1)
        request = urllib.request.Request(
            f"{base}/openai/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "demo", "prompt": "Hello", "max_tokens": 4}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            completion = json.load(response)
        assert completion["usage"]["completion_tokens"] == 4
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


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


def test_helm_test_pod_waits_for_readiness_then_completes():
    pod = ch.one(ch.template(BASE), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BASE_URL"] == "http://t-llm-predictor-predictor.llm.svc"
    assert env["MODEL_NAME"] == "llama-2-7b-chat"
    body = json.loads(env["REQUEST_BODY"])
    assert body["model"] == "llama-2-7b-chat" and body["max_tokens"] == 8
    script = container["args"][0]
    assert '"$BASE_URL/v1/models/$MODEL_NAME"' in script and "/openai/v1/completions" in script
    assert pod["spec"]["restartPolicy"] == "Never"


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


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("sh") is None, reason="needs sh and curl")
def test_helm_test_script_against_a_stub_predictor():
    pod = ch.one(ch.template(BASE, overrides={"apiKey": {"value": "k3y"}}), "Pod")
    container = pod["spec"]["containers"][0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubPredictor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env.update(BASE_URL=f"http://127.0.0.1:{server.server_address[1]}", POLL_SECONDS="0.1",
                   PREDICTOR_API_KEY="k3y", PATH=os.environ["PATH"])
        run = subprocess.run([*container["command"], container["args"][0]], env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "completion OK" in run.stdout and _StubPredictor.readiness_calls == 3
        env["PREDICTOR_API_KEY"] = "wrong"
        run = subprocess.run([*container["command"], container["args"][0]], env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode != 0
        assert _StubPredictor.completion_headers == ["Bearer k3y", "Bearer wrong"]
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------
# build/fetch_tools.py (the download itself needs PyPI; only the offline path is tested)
# ------------------------------------------------------------------------------------------------

def test_fetch_tools_is_idempotent(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fetch_tools", ch.REPO / "build" / "fetch_tools.py")
    fetch_tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_tools)
    for name in ("helm", "kubectl"):
        tool = tmp_path / name
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
        os.utime(tool, (0, 0))

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the tools are present")

    monkeypatch.setattr(fetch_tools.subprocess, "run", no_download)
    fetch_tools.fetch(tmp_path)
    assert (tmp_path / "helm").stat().st_mtime > 0  # touched, so make's target is up to date
