"""Rendering the chart: every example sized, restricted, round-tripped through the KServe SDK and validated
against Kubernetes' schema; autoscaling, deployment modes and pass-through values."""

from __future__ import annotations

import chart_helpers as ch
import pytest
import yaml
from chart_helpers import (
    BASE,
    CATALOG,
    EXAMPLE_FILES,
    EXPECTED_EXAMPLES,
    K8S_VERSION,
    args_of,
    container_of,
    isvc_of,
    pod_specs,
)

pytestmark = ch.needs_helm

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
    # The predictor sizes its KV cache (--gpu_memory_utilization on GPUs); the fit check counts an estimate of
    # sizing.kvSequences full-length sequences split over the ranks.
    assert "kv_cache_bytes" not in args
    expected_len = example["model"].get("maxModelLen") or entry["max_context"]
    sequences = example.get("sizing", {}).get("kvSequences", 4)
    kv = -(-entry["kv_bytes_per_token"] * expected_len * sequences // tp)
    if entry["chat_template"]:
        assert args["chat_template"] == entry["chat_template"]

    resources = container["resources"]
    if gpus:
        assert resources["limits"]["nvidia.com/gpu"] == str(gpus)
        assert resources["requests"]["nvidia.com/gpu"] == str(gpus)
        per_gpu = 1.10 * (entry["weight_bytes"] / tp + kv)
        assert per_gpu <= example["gpu"]["memoryGiB"] * 2**30
        assert args["gpu_memory_utilization"] == "0.9"
        assert 0.9 * example["gpu"]["memoryGiB"] * 2**30 - entry["weight_bytes"] / tp >= kv / sequences
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        assert "gpu_memory_utilization" not in args
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
# Autoscaling, deployment modes, values passed through
# ------------------------------------------------------------------------------------------------

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


def test_every_flag_the_chart_passes_is_a_predictor_setting():
    from predictor.config import Settings

    overrides = {"model": {"maxModelLen": 2048, "maxNumSeqs": 8, "maxQueue": 16, "kvCacheBytes": 2**30,
                           "chatTemplate": "chatml", "enforceEager": True}}
    objects = ch.template("examples/llama-2-70b-2node.yaml", overrides=overrides)
    containers = [container_of(objects), ch.one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]]
    for container in containers:
        start = container["args"].index("predictor") + 1  # torchrun's own options come first
        flags = {arg[2:].split("=", 1)[0] for arg in container["args"][start:]}
        assert {"max_model_len", "max_num_seqs", "max_queue", "kv_cache_bytes", "gpu_memory_utilization",
                "enforce_eager"} <= flags
        assert flags <= set(Settings.model_fields)
    flags = {arg[2:].split("=", 1)[0] for arg in container_of(ch.template(BASE, overrides=overrides))["args"]}
    assert flags <= set(Settings.model_fields)


def test_enforce_eager_is_passed_as_the_bare_flag_only_when_set():
    from predictor.config import load_settings

    args = container_of(ch.template(BASE, overrides={"model": {"enforceEager": True}}))["args"]
    assert "--enforce_eager" in args
    assert load_settings([a for a in args if a.startswith("--")]).enforce_eager
    assert not any("enforce_eager" in a for a in container_of(ch.template(BASE))["args"])


def test_async_scheduling_is_passed_as_the_bare_flag_only_when_set_and_refused_with_tensor_parallelism():
    from predictor.config import load_settings

    args = container_of(ch.template(BASE, overrides={"model": {"asyncScheduling": True}}))["args"]
    assert "--async_scheduling" in args
    assert load_settings([a for a in args if a.startswith("--")]).async_scheduling
    assert not any("async_scheduling" in a for a in container_of(ch.template(BASE))["args"])
    with pytest.raises(ch.HelmError, match="model.asyncScheduling needs a tensor parallel size of 1 \\(got 8\\)"):
        ch.template("examples/llama-2-70b-2node.yaml", overrides={"model": {"asyncScheduling": True}})


@pytest.mark.parametrize("grace, drain, torchrun", [(60, "45", "55"), (300, "285", "295"), (10, "1", "5")])
def test_the_shutdown_timeouts_fit_the_termination_grace_period(grace, drain, torchrun):
    """Running requests get the grace period less 15 s: time to end the rest in their own shape and exit before
    the kubelet's SIGKILL; torchrun (multi-node) waits less 5 s for its ranks."""
    objects = ch.template("examples/llama-2-70b-2node.yaml", overrides={"terminationGracePeriodSeconds": grace})
    head = container_of(objects)
    assert isvc_of(objects)["spec"]["predictor"]["terminationGracePeriodSeconds"] == grace
    assert args_of(head)["shutdown_timeout"] == drain
    assert f"--shutdown_timeout={torchrun}" in head["args"][:head["args"].index("predictor")]
    single = ch.template(BASE, overrides={"terminationGracePeriodSeconds": grace})
    assert args_of(container_of(single))["shutdown_timeout"] == drain


def test_image_digest_wins_over_tag():
    digest = "sha256:" + "ab" * 32
    container = container_of(ch.template(BASE, overrides={"image": {"digest": digest}}))
    assert container["image"] == f"registry.example.com/llm/llama-2-7b-chat@{digest}"
