# moco-zoo: every target creates/reuses the local virtualenv .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project is tested with; override on machines that want another (e.g. a CUDA index).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
FAST ?= 0
COCO ?= 0
SEG ?= 0

.PHONY: venv detectron2 demo test test-slow test-all bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

## detectron2 for the --engine detectron2 backend and its tests. detectron2 has no PyPI release: this installs it from
## ../shared/third_party/ when that folder exists (the wheel built for torch 2.14.1 / Python 3.11, else the pinned source);
## elsewhere install it from source yourself (see transfer/README.md).
D2_DIR ?= ../shared/third_party
detectron2: venv
	@if $(PY) -c "import detectron2, detectron2._C" 2>/dev/null; then echo "detectron2 already installed"; \
	elif [ -d "$(D2_DIR)" ]; then \
		whl=$$(ls $(D2_DIR)/wheels/detectron2-*-cp311-*.whl 2>/dev/null | head -n 1); \
		if [ -n "$$whl" ] && $(PY) -c "import sys, torch; sys.exit(not (sys.version_info[:2] == (3, 11) and torch.__version__.startswith('2.14.1')))"; then \
			$(PY) -m pip install --quiet "$$whl"; \
		else \
			$(PY) -m pip install --quiet 'setuptools<81' && \
			$(PY) -m pip install --quiet --no-build-isolation $(D2_DIR)/detectron2-*.tar.gz; \
		fi; \
		$(PY) -c "import detectron2, detectron2._C; print('detectron2', detectron2.__version__, 'installed')"; \
	else echo "no $(D2_DIR): detectron2 not installed (its tests skip)"; fi

## The main job on the embedded synthetic data (FAST=1: a few-minute smoke version; COCO=1 / SEG=1 add the COCO
## Mask R-CNN and VOC segmentation stages to the full run, about 3 and 1 extra minutes).
demo: venv
	$(PY) -m tools.demo --output-dir demo_out $(if $(filter 1,$(FAST)),--fast,) $(if $(filter 1,$(COCO)),--coco,) \
		$(if $(filter 1,$(SEG)),--seg,)

## The default test suite (slow tests excluded), the same command CI runs.
test: venv
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

## Slow tests only (end-to-end runs, the demo smoke test).
test-slow: venv
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/machine_peak.py
	$(PY) bench/augment_throughput.py
	$(PY) bench/pretrain_throughput.py

clean:
	rm -rf demo_out .pytest_cache
