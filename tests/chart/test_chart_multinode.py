"""Multi-node tensor parallelism: the head, the worker StatefulSet, the rendezvous, and the rendered
commands run as two local nodes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import chart_helpers as ch
import pytest
from chart_helpers import args_of, container_of, isvc_of

pytestmark = ch.needs_helm

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
    assert head["args"][:9] == ["--node_rank=0", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=static", rdzv,
                                "--rdzv_conf=timeout=1800", "--max_restarts=0", "--shutdown_timeout=55", "-m"]
    assert head["args"][9] == "predictor"
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
