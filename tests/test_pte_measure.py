"""`measure_pte` refuses a program whose static KV cache leaves no room for a prompt
before the decode steps, naming the cache length and what to export instead."""

from __future__ import annotations

from pathlib import Path

import pytest

import flexrank.exporters.executorch.measure as measure


@pytest.mark.parametrize("max_len, new_tokens", [(17, 16), (10, 16)])
def test_a_cache_too_short_for_prompt_and_decode_is_refused(monkeypatch, max_len, new_tokens):
    monkeypatch.setattr(measure, "constant_methods", lambda path: {"get_max_seq_len": max_len})
    monkeypatch.setattr(measure, "load_method", lambda path: pytest.fail("loaded anyway"))
    with pytest.raises(ValueError, match=f"holds {max_len} positions.*above {new_tokens + 1}"):
        measure.measure_pte(Path("model.pte"), 1.0, None, 64, new_tokens)


def test_the_manifests_cache_length_spares_a_load(monkeypatch):
    monkeypatch.setattr(measure, "constant_methods", lambda path: pytest.fail("program read"))
    monkeypatch.setattr(measure, "load_method", lambda path: pytest.fail("loaded anyway"))
    with pytest.raises(ValueError, match="holds 12 positions.*above 17"):
        measure.measure_pte(Path("model.pte"), 1.0, None, 64, 16, max_seq_len=12)
