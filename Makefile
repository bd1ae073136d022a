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

# S3 data copied to a node: a pool of threads against one object at a time, and a copy found in place, from
# the local stack's S3 endpoint (~1 minute on 2 cores): a section of benchmarks/RESULTS.md
.PHONY: bench-s3
bench-s3: $(STAMP)
	$(PY) -m benchmarks.s3_copy

# Where a `retinaops train` run's time goes, per worker layout, beside the bare train step of the same model
# (~5 minutes on 2 quiet cores): benchmarks/E2E.md + E2E.png + E2E.json
.PHONY: bench-e2e
bench-e2e: $(STAMP)
	$(PY) -m benchmarks.e2e

# The demo sweep's wall time split into training and overhead, one trial at a time, evaluating every epoch
# (before) and only at ASHA's rungs (after), 6 epochs of 10 steps (~4.5 minutes on 2 quiet cores): benchmarks/SWEEP.md +
# sweep_overhead.json
.PHONY: bench-sweep
bench-sweep: $(STAMP)
	$(PY) -m benchmarks.sweep_overhead --variants --epochs 6 --steps 10

# On a CUDA GPU: one `retinaops train` of R50 at 800 px in bf16 on generated JPEGs beside the bare step, GPU
# utilisation and memory (~3-4 minutes on an H100, estimated: not yet run on one): a section of benchmarks/GPU_RESULTS.md; its files in $OUT if set
.PHONY: bench-gpu-e2e
bench-gpu-e2e: $(STAMP)
	$(PY) -m benchmarks.gpu_e2e $(if $(OUT),--out-dir $(OUT))

# Decode + augment images/s per core for 800 px JPEGs (PIL vs decode_jpeg, DataLoader workers) and the cores a
# GPU at 187 images/s needs (~1 minute on 2 quiet cores): benchmarks/INPUT.md + input_pipeline.json
.PHONY: bench-input
bench-input: $(STAMP)
	$(PY) -m benchmarks.input_pipeline

demo: $(STAMP)
	RETINAOPS_HOME=$(HOME_DIR) $(VENV)/bin/retinaops demo

# The local service stack on 127.0.0.1 (S3, MLflow, a two-node Ray cluster); then: . .retinaops/stack/env
stack-up: $(STAMP)
	RETINAOPS_HOME=$(HOME_DIR) $(VENV)/bin/retinaops stack up

stack-down: $(STAMP)
	RETINAOPS_HOME=$(HOME_DIR) $(VENV)/bin/retinaops stack down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
