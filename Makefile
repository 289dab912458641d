# Two commands do everything on a fresh machine:
#   make serve   install, make sure a model exists in model_repository/ (NVIDIA's COCO
#                checkpoint, else a random-init one saying why), start the service
#   make test    install, lint, run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8080
CHECKPOINT ?=
REPO ?= model_repository
BACKEND ?= onnx
STAMP := $(VENV)/.installed

USERS ?= 1 4 16
LOADTEST_SECONDS ?= 30
LOADTEST_HOST ?=

.PHONY: install system-deps prepare test lint serve model bench loadtest reliability compose-test k8s-test docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: these builds are the ones the project is tested with
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 "numpy>=1.26,<2"
	$(PIP) install -q -e ".[serve,openvino,train,dev]"
	touch $@

install: $(STAMP)

# Debian chromium for the browser tests (never a browser download by Playwright); GStreamer's
# RTSP server (through Debian's python3-gi) as the stream tests' camera (devtools/rtsp_server.py)
RTSP_PACKAGES := python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base \
	gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: browser tests will be skipped (install Debian's chromium)"; fi; }
	@dpkg -s $(RTSP_PACKAGES) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(RTSP_PACKAGES) >/dev/null; \
	  else echo "GStreamer's RTSP server missing: the RTSP stream test will be skipped ($(RTSP_PACKAGES))"; fi; }
	@# in CI the compose, Kubernetes (podman) and Slurm tests install their engines when missing;
	@# installed here instead, beside the Python environment (make test runs the two at once)
	@# (each only where its commands are missing, as the tests decide: a docker-ce stays)
	@if [ -n "$$CI" ] && [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then missing=""; \
	  command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	  { command -v podman && command -v catatonit; } >/dev/null || missing="$$missing podman catatonit"; \
	  { command -v slurmctld && command -v slurmd && command -v munged && command -v sbatch; } \
	    >/dev/null || missing="$$missing slurm-wlm munge"; \
	  command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	  [ -z "$$missing" ] || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; fi

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the Python environment and the system packages at once (pip beside apt on a fresh machine)
prepare:
	@$(MAKE) --no-print-directory -j2 install system-deps

# every test; in CI (CI=true) this includes the compose stack built and run for real
test: prepare
	@$(MAKE) --no-print-directory lint
	$(PY) -m pytest

# both images built from the Dockerfiles and the compose stack run for real (the engine installed
# when root on Debian; stand-in base images where the official ones cannot be pulled; the training
# image fetches torch's CUDA wheels); fails, never skips, without an engine. make test runs the
# same tests in CI.
compose-test: install
	SSD_COMPOSE_REQUIRED=1 $(PY) -m pytest -m compose -s tests/deploy/test_compose_stack.py tests/deploy/test_compose_full.py

# the Helm chart installed into the current kube context (rollout, a request through a
# port-forward, scale to 2 and back, uninstall); skipped with the reason where there is none.
# K8S_VALUES: a values file (default deploy/helm/ssd300/ci/cpu-values.yaml)
K8S_VALUES ?=
k8s-test: install
	$(PY) -m deploy.k8s_test $(if $(K8S_VALUES),--values $(K8S_VALUES),)

model: install
	$(PY) -m training.export --output $(REPO) --ensure $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--checkpoint nvidia --fallback-random-init)

serve: model
	$(PY) -m service --host $(HOST) --port $(PORT) --model-repository $(REPO) --backend $(BACKEND)

# docs/benchmarks.md: every benchmark it names rerun, one after the other, its blocks rewritten
# (about 30 minutes on two cores); ONLY="gateway_bench train_bench" reruns some
ONLY ?=
bench: model
	$(PY) benchmarks/report.py $(if $(ONLY),--only $(ONLY),)

# locust headless against the service (started here on the embedded backend unless LOADTEST_HOST)
loadtest: install
	$(PY) loadtest/run.py --users $(USERS) --seconds $(LOADTEST_SECONDS) $(if $(LOADTEST_HOST),--host $(LOADTEST_HOST),)

# docs/settings.md from service/settings.py (a test keeps them equal)
docs: install
	$(PY) -c "from service.settings import settings_markdown; open('docs/settings.md', 'w').write(settings_markdown())"

# docs/reliability.md: the reliability tests and a 10-minute soak, tabulated
reliability: install
	$(PY) loadtest/reliability_report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
