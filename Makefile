# Two entry points: `make demo` runs the whole chain on the built-in demo model, `make test` runs the suite.
# Both create .venv and install the project on first use. torch is pinned so the CPU wheel is used.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test install bench clean

$(BIN)/mopeq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/mopeq

install: $(BIN)/mopeq

demo: install
	$(BIN)/mopeq demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-out
