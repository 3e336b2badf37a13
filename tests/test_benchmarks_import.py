"""Every benchmark script imports (they share helpers, and a renamed helper once broke
bench_executorch.py unnoticed: scripts are run by hand, not by the suite)."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    assert callable(module.main), f"benchmarks/{name}.py has no main()"
    sys.modules.pop(name, None)


def test_every_script_is_found():
    assert {"bench_onnx", "bench_quality", "bench_report", "bench_executorch"} <= set(SCRIPTS)
