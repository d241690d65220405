# Two commands on a fresh machine: `make test` and `make demo` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_DIR ?= .cache/models/tiny
SAMPLES := model_build/tiny_blip/samples

.PHONY: test demo lint clean serve bench quality screenshots chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# the serving dependencies only (no torch)
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# one stamp per extra, redone when pyproject.toml changes
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[$*]'
	touch $@

test: $(VENV)/.installed-test chromium
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The browser tests drive Debian's Chromium (Playwright's own browser download cannot work offline).
# Installed with apt when missing and possible; otherwise the browser tests skip, saying why.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "no Chromium (apt-get install chromium): the browser tests will be skipped"

# The README's pictures (docs/*.png): a real Label Studio and the backend, driven by Chromium.
screenshots: $(VENV)/.installed-test chromium
	SCREENSHOTS_DIR=docs $(BIN)/pytest -q tests/test_browser.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# rebuilt when the model directory's format may have changed (FORMAT lives in manifest.py)
$(MODEL_DIR)/manifest.json: backend/runtime/manifest.py | $(VENV)/.installed-build
	$(BIN)/blip-build tiny -o $(MODEL_DIR) --force

# Caption the bundled sample images and answer questions about them with the bundled test model.
demo: $(VENV)/.installed-build $(MODEL_DIR)/manifest.json
	$(BIN)/blip-backend ask --model-dir $(MODEL_DIR) $(SAMPLES)/*.png \
		-q "how many objects are there?" -q "what shape is on the left?" -q "is there a red circle?"

# Speed side by side (PyTorch eager, notebook-style OpenVINO INT8, this project): see bench/run.py.
bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# INT8 quality on the bundled test models: plain NNCF vs accuracy control, next to PyTorch (bench/quality.py).
quality: $(VENV)/.installed-test
	$(BIN)/python bench/quality.py $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) .cache

# Serve the Label Studio ML backend on :9090 (PORT, WORKERS, THREADS, LABEL_STUDIO_URL, ... from the
# environment). Without MODEL_DIR it builds the bundled tiny test model first and serves that.
SERVE_NEEDS := $(if $(filter file,$(origin MODEL_DIR)),$(VENV)/.installed-build $(MODEL_DIR)/manifest.json,$(VENV)/.installed)
serve: $(SERVE_NEEDS)
	MODEL_DIR=$(MODEL_DIR) $(BIN)/blip-backend serve
