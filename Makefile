# Two commands set everything up on a fresh machine:
#   make demo   # venv + install, then the whole pipeline on the bundled demo model and corpus
#   make test   # venv + install, then the CPU test suite (what CI runs)
# GPU tests (marker `gpu`, skipped without CUDA): make test-gpu

VENV ?= .venv
PYTHON ?= python3
# torch first, pinned, so pip takes a local or matching build instead of resolving a
# random one through another package; on a CUDA machine PyPI's build of this version is the CUDA one.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specmoe-installed
DEMO := runs/demo

.PHONY: install demo test test-gpu clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m tracing.model_report --split test --max-tokens 4096
	HF_HUB_OFFLINE=1 $(VENV)/bin/trace --out $(DEMO)/trace-train --split train --max-tokens 65536 --resume
	HF_HUB_OFFLINE=1 $(VENV)/bin/trace --out $(DEMO)/trace-test --split test --max-tokens 32768 --resume
	HF_HUB_OFFLINE=1 $(VENV)/bin/train --traces $(DEMO)/trace-train --eval-traces $(DEMO)/trace-test \
		--lookahead 1 --out $(DEMO)/estimator-h1 --skip-existing
	HF_HUB_OFFLINE=1 $(VENV)/bin/infer generate "ROMEO. What light through yonder window breaks?" \
		--estimators $(DEMO)/estimator-h1 --prefetch hybrid --on-miss fetch --gpu-expert-budget 25% --max-new-tokens 48
	HF_HUB_OFFLINE=1 $(VENV)/bin/infer bench --estimators $(DEMO)/estimator-h1 --budgets 0,25% \
		--modes none+fetch,hybrid+fetch,hybrid+cpu,hybrid+speculate --prompt-tokens 128 --decode-tokens 24 \
		--out $(DEMO)/bench

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu"

test-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu

clean-demo:
	rm -rf $(DEMO)
