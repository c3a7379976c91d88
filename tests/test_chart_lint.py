"""Packaging and lint of the chart (charts/llm-predictor), and build/fetch_tools.py that installs helm."""

from __future__ import annotations

import importlib.util
import os
import tarfile

import chart_helpers as ch
import pytest
from chart_helpers import EXAMPLE_FILES, EXPECTED_EXAMPLES

pytestmark = ch.needs_helm

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
