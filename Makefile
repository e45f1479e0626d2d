# Two commands do everything on a fresh machine: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
STEPS ?= 200

.PHONY: setup demo test gpu-setup

setup: $(VENV)/.installed

# On a machine without an NVIDIA GPU, install the small CPU build of torch the way PyTorch documents it for CPU-only
# machines (its CPU wheel index, https://pytorch.org/get-started/locally/); never let pip pick the multi-GB CUDA build
# there. Where that index cannot be reached (an offline mirror, a CI box that sees only package registries) the
# attempt fails fast (--timeout 5 --retries 0) and we fall back to a local wheel cache's 'torch==$(TORCH_CPU)', then to
# plain 'torch>=2.6' from the configured registry.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU ?= 2.13.0+cpu
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q 'torch>=2.6'; \
	else $(PY) -m pip install -q --timeout 5 --retries 0 --index-url $(TORCH_CPU_INDEX) 'torch>=2.6' \
	  || $(PY) -m pip install -q 'torch==$(TORCH_CPU)' || $(PY) -m pip install -q 'torch>=2.6'; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# torchao is not in the dev extra (it is a GPU package: float8 training); the float8 CPU tests run torch's software
# float8 through it, so the tests install it here to keep those tests running instead of skipping.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q 'torchao>=0.12'
	touch $@

demo: setup
	$(VENV)/bin/batchpilot train --preset tiny --data default --max-steps $(STEPS) --out $(RUN)
	$(VENV)/bin/batchpilot sample --model $(RUN)/model --prompt "And God said" --prompt "In the beginning" \
		--max-tokens 48 --temperature 0.8 --seed 0
	$(VENV)/bin/batchpilot report $(RUN)
	@echo "run directory: $(RUN)  (metrics.jsonl, config.json, checkpoints/, model/, report/report.html)"

test: setup $(VENV)/.test-installed
	$(VENV)/bin/ruff check batchpilot tests benchmarks
	$(PY) -m mypy  # the package, configured in pyproject.toml ([tool.mypy])
	$(PY) -m pytest -q
