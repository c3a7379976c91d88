"""The chart's install-time checks: GPU sizing against the catalog, consistency of replicas and multi-node
settings, values.schema.json, custom models and the startup allowance."""

from __future__ import annotations

from functools import cache

import chart_helpers as ch
import pytest
from chart_helpers import BASE, CATALOG, args_of, container_of

from predictor import model_facts

pytestmark = ch.needs_helm

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


GPU_NODE_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]}}}


@pytest.mark.parametrize(("overrides", "named"), [
    ({}, "nodeSelector nvidia.com/gpu.product, toleration nvidia.com/gpu"),  # the example's own
    ({"nodeSelector": None, "tolerations": None, "affinity": GPU_NODE_AFFINITY},
     "required node affinity nvidia.com/gpu.present"),
])
def test_cpu_only_refuses_scheduling_that_still_targets_gpu_nodes(overrides, named):
    """Issue 20: gpu.enabled=false on a GPU example rendered silently, its GPU nodeSelector and toleration kept."""
    error = ch.template_error(BASE, overrides={**overrides, "gpu": {"enabled": False}})
    assert f"gpu.enabled=false runs the model on CPU, but the values still steer the pods to GPU nodes ({named})" \
        in error
    assert "--set nodeSelector=null,tolerations=null" in error


def test_cpu_only_renders_once_the_gpu_scheduling_is_removed():
    objects = ch.template(BASE, sets=("gpu.enabled=false", "nodeSelector=null", "tolerations=null"))
    predictor = ch.isvc_of(objects)["spec"]["predictor"]
    assert "nodeSelector" not in predictor and "tolerations" not in predictor
    assert "nvidia.com/gpu" not in str(container_of(objects)["resources"])
    cpu_pool = {"nodeSelector": {"kubernetes.io/arch": "amd64"}, "tolerations": [{"key": "pool", "operator": "Exists"}]}
    predictor = ch.isvc_of(ch.template("examples/demo-cpu.yaml", overrides=cpu_pool))["spec"]["predictor"]
    assert predictor["nodeSelector"] == cpu_pool["nodeSelector"] and predictor["tolerations"] == cpu_pool["tolerations"]


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_sizing_agrees_with_the_catalog(name):
    """At the catalog's default TP and the default KV estimate, a GPU needs the catalog's gpu_memory_bytes / tp:
    the chart passes with 0.1% more memory and fails with 0.1% less. (gpu_memory_bytes lets the predictor have the
    whole GPU, hence gpuMemoryUtilization 1; test_gpu_memory_utilization_leaves_room_for_the_weights covers less.)"""
    entry = CATALOG[name]
    tp = entry["default_tensor_parallel_size"]
    need_gib = entry["gpu_memory_bytes"] / tp / 2**30
    overrides = {"model": {"catalogName": name, "tensorParallelSize": tp, "gpuMemoryUtilization": 1.0},
                 "gpu": {"perNode": 8}}
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
    ({"model": {"gpuMemoryUtilization": 0}}, "at '/model/gpuMemoryUtilization'"),
    ({"model": {"gpuMemoryUtilization": 1.5}}, "at '/model/gpuMemoryUtilization'"),
])
def test_schema_rejects_bad_values(overrides, message):
    error = ch.template_error(BASE, overrides=overrides)
    assert "values don't meet the specifications of the schema" in error
    assert message in error


# ------------------------------------------------------------------------------------------------
# The KV cache: sized by the predictor from gpuMemoryUtilization, or fixed by model.kvCacheBytes
# ------------------------------------------------------------------------------------------------

def test_gpu_memory_utilization_is_passed_on_gpus_only():
    assert args_of(container_of(ch.template(BASE)))["gpu_memory_utilization"] == "0.9"
    args = args_of(container_of(ch.template(BASE, overrides={"model": {"gpuMemoryUtilization": 0.95}})))
    assert args["gpu_memory_utilization"] == "0.95" and "kv_cache_bytes" not in args
    cpu_only = {"gpu": {"enabled": False}, "model": {"device": "cpu"}, "nodeSelector": None, "tolerations": None}
    args = args_of(container_of(ch.template(BASE, overrides=cpu_only)))
    assert "gpu_memory_utilization" not in args and "kv_cache_bytes" not in args


def test_kv_cache_bytes_is_an_override_the_fit_check_counts():
    overrides = {"model": {"kvCacheBytes": 6 * 2**30}}
    args = args_of(container_of(ch.template(BASE, overrides=overrides)))
    assert args["kv_cache_bytes"] == str(6 * 2**30)
    plan = ch.plan(BASE, overrides=overrides)
    assert (plan["kvSource"], plan["kvCacheBytesPerRank"]) == ("kvCacheBytes", 6 * 2**30)
    error = ch.template_error(BASE, overrides={"model": {"kvCacheBytes": 12 * 2**30}})
    assert "needs 27.0 GiB (weights 12.6 GiB / 1 GPUs + KV cache 12.0 GiB for model.kvCacheBytes per GPU" in error


def test_gpu_memory_utilization_leaves_room_for_the_weights():
    """The predictor gives the KV cache gpuMemoryUtilization of the GPU less the weights: a share that cannot hold
    the weights and one sequence fails at install, not at start. A fixed model.kvCacheBytes is not checked so."""
    error = ch.template_error(BASE, overrides={"model": {"gpuMemoryUtilization": 0.5}})
    assert ("llama-2-7b-chat does not fit in model.gpuMemoryUtilization 0.5 of a 24 GiB GPU: that leaves 12.0 GiB "
            "for its share of the weights (12.6 GiB / 1 GPUs = 12.6 GiB) and a KV cache of at least one sequence of "
            "4096 tokens (2.00 GiB), so the predictor could not start. Raise model.gpuMemoryUtilization") in error
    # falcon-7b on a GPU just big enough for the catalog's estimate: its weights alone take 90% of it.
    entry = CATALOG["falcon-7b"]
    overrides = {"model": {"catalogName": "falcon-7b", "tensorParallelSize": 1},
                 "gpu": {"memoryGiB": round(entry["gpu_memory_bytes"] * 1.001 / 2**30, 4)}}
    assert "falcon-7b does not fit in model.gpuMemoryUtilization 0.9" in ch.template_error(BASE, overrides=overrides)
    overrides["model"]["gpuMemoryUtilization"] = 0.95
    assert ch.plan(BASE, overrides=overrides)["kvBudgetBytesPerRank"] > entry["kv_bytes_per_token"] * 2048
    overrides["model"].update(gpuMemoryUtilization=0.9, kvCacheBytes=2**26)
    assert args_of(container_of(ch.template(BASE, overrides=overrides)))["kv_cache_bytes"] == str(2**26)


def test_kv_budget_is_what_gpu_memory_utilization_leaves():
    plan = ch.plan(BASE)
    entry = CATALOG["llama-2-7b-chat"]
    assert plan["kvSource"] == "gpuMemoryUtilization"
    assert plan["kvBudgetBytesPerRank"] == pytest.approx(0.9 * 24 * 2**30 - entry["weight_bytes"])
    assert plan["kvCacheBytesPerRank"] == entry["kv_bytes_per_token"] * 4096 * 4  # the fit check's estimate
    assert ch.plan("examples/demo-cpu.yaml")["kvSource"] == "predictor default"


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_kv_rule_agrees_with_model_facts(name):
    """_sizing.tpl's KV bytes per token per rank and head counts are predictor/model_facts.py's, for every catalog
    model, tensor parallel size (valid or not: a rank holds at least one KV head) and serving dtype."""
    entry = CATALOG[name]
    chart = _chart_kv_rule()[name]
    assert (chart["heads"], chart["kvHeads"]) == model_facts.head_counts(entry)
    assert chart["headDim"] == model_facts.head_dim(entry)
    for key, kv in chart["kv"].items():
        tp, dtype = key.split("/")
        dtype_bytes = model_facts.DTYPE_BYTES[entry["dtype"] if dtype == "auto" else dtype]
        assert kv == model_facts.config_kv_bytes_per_token(entry, dtype_bytes, int(tp)), (name, key)
    assert chart["kv"]["1/auto"] == entry["kv_bytes_per_token"]


@cache
def _chart_kv_rule() -> dict[str, dict]:
    """The chart's facts and KV rule for every catalog model, tp in 1, 2, 4, 8, 16 and every serving dtype,
    from one render that calls the chart's own helpers."""
    return ch.render_extra('''
{{- $out := dict }}
{{- range $name, $e := (.Files.Get "catalog.yaml" | fromYaml).models }}
{{- $facts := include "llm-predictor.catalogFacts" (dict "name" $name "entry" $e) | fromJson }}
{{- $kv := dict }}
{{- range $tp := list 1 2 4 8 16 }}
{{- range $dtype := list "auto" "float32" "float16" "bfloat16" }}
{{- $rule := include "llm-predictor.kvBytesPerTokenPerRank" (dict "facts" $facts "tp" $tp "dtype" $dtype) }}
{{- $_ := set $kv (printf "%d/%s" $tp $dtype) ($rule | int64) }}
{{- end }}
{{- end }}
{{- $_ := set $out $name (merge (dict "kv" $kv) $facts) }}
{{- end }}
{{- $out | toJson }}
''', BASE)


def test_empty_image_fails_without_any_values_file():
    error = ch.template_error(overrides={"image": {"repository": ""}})
    assert "at '/image/repository': minLength: got 0, want 1" in error


# ------------------------------------------------------------------------------------------------
# Custom models, the startup allowance
# ------------------------------------------------------------------------------------------------

def test_custom_model_outside_the_catalog():
    custom = {"numAttentionHeads": 32, "numKeyValueHeads": 8, "weightBytes": 16_060_522_496,
              "kvBytesPerToken": 131072, "maxContext": 8192, "dtype": "bfloat16"}
    overrides = {"model": {"catalogName": "", "name": "my-llm", "chatTemplate": "chatml", "tensorParallelSize": 2,
                           "custom": custom}}
    objects = ch.template(BASE, overrides=overrides)
    args = args_of(container_of(objects))
    assert args["model_name"] == "my-llm" and args["chat_template"] == "chatml"
    assert "kv_cache_bytes" not in args
    assert ch.plan(BASE, overrides=overrides)["kvCacheBytesPerRank"] == 131072 * 8192 * 4 // 2  # the fit check's
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
