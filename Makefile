# The README's commands. Each target creates or reuses .venv by itself.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOME_DIR ?= $(CURDIR)/.retinaops

.PHONY: venv test test-fast lint bench demo clean stack-up stack-down

venv: $(STAMP)

# Reinstall when the project's dependencies change. pip takes torch/torchvision from local disk.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[platform,test]"
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check retinanet platform tests benchmarks
	$(VENV)/bin/ruff format --check retinanet platform tests benchmarks

# The whole suite, integration tests included. pytest exits 5 when it collected nothing: that fails too.
test: lint
	$(PY) -m pytest tests

# Unit tests only: the inner loop.
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -m "not slow and not integration"

bench: $(STAMP)
	$(PY) -m benchmarks.run --out benchmarks/RESULTS.md

# AP against latency on the synthetic set (~19 min on 2 quiet cores): benchmarks/AP_LATENCY.md + ap_latency.png
.PHONY: bench-ap
bench-ap: $(STAMP)
	$(PY) -m benchmarks.ap_latency

# torchvision's RetinaNet and ours learning side by side on the demo's recipe and data (~10 min on 2 quiet
# cores): benchmarks/LEARNING.md + learning.png + learning.json
.PHONY: bench-learn
bench-learn: $(STAMP)
	$(PY) -m benchmarks.learn

# Loading a COCO-sized annotation file (118k images, 860k boxes) and evaluating at val2017 size, against
# pycocotools (~5 min on 2 cores; ~0.5 GB of temporary data, removed): a section of benchmarks/RESULTS.md
.PHONY: bench-coco
bench-coco: $(STAMP)
	$(PY) -m benchmarks.coco_scale

# Where a `retinaops train` run's time goes, per worker layout, beside the bare train step of the same model
# (~5 minutes on 2 quiet cores): benchmarks/E2E.md + E2E.png + E2E.json
.PHONY: bench-e2e
bench-e2e: $(STAMP)
	$(PY) -m benchmarks.e2e

demo: $(STAMP)
	RETINAOPS_HOME=$(HOME_DIR) $(VENV)/bin/retinaops demo

# The local service stack on 127.0.0.1 (S3, MLflow, a two-node Ray cluster); then: . .retinaops/stack/env
stack-up: $(STAMP)
	RETINAOPS_HOME=$(HOME_DIR) $(VENV)/bin/retinaops stack up

stack-down: $(STAMP)
	RETINAOPS_HOME=$(HOME_DIR) $(VENV)/bin/retinaops stack down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
