# irn-ray: `make test` builds .venv from requirements.txt (when missing or stale) and runs the tests;
# `make demo` labels the generated synthetic set end to end on local Ray, then trains Mask R-CNN
# on the labels and on the ground truth and prints one table: the method's ablation and the two fits.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1
export RAY_DATA_LOG_LEVEL ?= WARNING

.PHONY: venv test test-fast demo benchmarks gpu-check clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m jobs.make_synthetic --out demo_data --num-images 80 --seed 0 --min-size 128 --max-size 192 --radius 0.14 0.24
	$(PY) -m jobs.label --config configs/demo.yaml
	$(PY) -m jobs.train_segmenter --config configs/demo.yaml --set segmenter.model=maskrcnn --set segmenter.labels=both
	@echo; $(PY) -m jobs.summary --root runs/demo

.PHONY: docs
docs: $(STAMP)  # docs/configuration.md from the field comments of pipeline/config.py
	$(PY) -m pipeline.config_reference

benchmarks: $(STAMP)
	$(PY) benchmarks/random_walk.py

# On a machine with a CUDA GPU: stage and training images/s (fp32, bf16), the CUDA random walk
# against the CPU one, a tiny label job on the GPU (docs/benchmarks.md). Without one: says so, exit 0.
gpu-check: $(STAMP)
	timeout 480 $(PY) benchmarks/gpu_check.py

clean:
	rm -rf runs demo_data .pytest_cache
