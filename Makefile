# Two commands do everything on a fresh machine: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
STEPS ?= 200

.PHONY: setup demo test gpu-setup

setup: $(VENV)/.installed

# On a machine without an NVIDIA GPU, pin the small CPU build of torch (from the local wheel cache,
# else PyPI's plain torch); never let pip pick the 5 GB CUDA build there.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q 'torch>=2.6'; \
	else $(PY) -m pip install -q 'torch==2.13.0+cpu' || $(PY) -m pip install -q 'torch>=2.6'; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/batchpilot train --preset tiny --data default --max-steps $(STEPS) --out $(RUN)
	$(VENV)/bin/batchpilot sample --model $(RUN)/model --prompt "And God said" --prompt "In the beginning" \
		--max-tokens 48 --temperature 0.8 --seed 0
	$(VENV)/bin/batchpilot report $(RUN)
	@echo "run directory: $(RUN)  (metrics.jsonl, config.json, checkpoints/, model/, report/report.html)"

test: setup
	$(VENV)/bin/ruff check batchpilot tests benchmarks
	$(PY) -m pytest -q
