# Every target installs what it needs: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools/bin
HELM ?= $(shell command -v helm 2>/dev/null || echo $(CURDIR)/$(TOOLS)/helm)
export HELM

.PHONY: install run test bench lint tools image scale chart-docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Serves the embedded demo model on :8080 unless ARGS name another (e.g. ARGS="--model_dir /path").
run: install
	$(PY) -m predictor $(ARGS)

test: install tools $(VENV)/.guidellm-installed
	$(PY) -m pytest $(PYTEST_ARGS)

$(VENV)/.guidellm-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[guidellm]'
	touch $@

# Server vs raw decode loop vs one request at a time on the demo model; results under bench-results/.
bench: $(VENV)/.bench-installed
	$(PY) -m predictor bench $(ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

lint: install
	$(VENV)/bin/ruff check predictor tests build examples

tools: $(TOOLS)/helm $(VENV)/.chart-lint-installed

$(TOOLS)/helm: build/fetch_tools.py
	@if command -v helm >/dev/null 2>&1; then mkdir -p $(TOOLS) && ln -sf "$$(command -v helm)" $@; \
	else $(PYTHON) build/fetch_tools.py $(TOOLS); fi

# What chart-testing's `ct lint` runs besides helm (ct itself is a Go binary that no reachable registry ships);
# tests/test_chart_lint.py runs ct's checks with them.
$(VENV)/.chart-lint-installed: $(VENV)/.installed
	$(PY) -m pip install -q yamllint==1.38.0 yamale==6.0.0
	touch $@

# charts/llm-predictor/README.md from its README.md.gotmpl and the `# --` comments of values.yaml (helm-docs' format).
chart-docs: install
	$(PY) build/chart_docs.py charts/llm-predictor

# make image MODEL=<catalog name | model dir | demo> TAG=<registry/repo:tag> [MODEL_DIR=<weights of a catalog name>] [PUSH=1]
image: install
	$(PY) build/build_image.py --model "$(MODEL)" --tag "$(TAG)" $(if $(PUSH),--push,)

# make scale NAME=<release> REPLICAS=N [NAMESPACE=ns]
scale:
	kubectl $(if $(NAMESPACE),-n $(NAMESPACE),) patch inferenceservice "$(NAME)" --type merge \
	  -p '{"spec":{"predictor":{"minReplicas":$(REPLICAS),"maxReplicas":$(REPLICAS)}}}'

clean:
	rm -rf $(VENV) .tools .cache build/context
