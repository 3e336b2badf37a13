"""int4 on the real SmolLM2-135M (issue 15), one small case: a DataSVD-only factorisation
(no distillation) at one budget, exported in int4 (RTN, blocks of 32, the tied table in 4
bits, stored once). onnxruntime-genai's og.Generator, on the budget folder as it is,
generates the greedy tokens ElasticSession generates; the file holds about 5 bits a
weight."""

from __future__ import annotations

import numpy as np
import onnxruntime_genai as og
import pytest
from conftest import SHAKESPEARE
from elastic_fixtures import nested_plan

import flexrank
from flexrank.compress.calibration import calibration_data
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.runtime.session import ElasticSession

BETA = 0.6
STEPS = 24


def og_greedy(folder, prompt: np.ndarray, steps: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.real_model
def test_smollm2_int4_og_generates_what_elastic_session_generates(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = flexrank.load_model("smollm2-135m")
    batches = calibration_data(tokenizer, str(SHAKESPEARE), num_samples=64, seq_len=64,
                               batch_size=16)
    factorize_(model, collect_covariances(model, batches, progress=False), progress=False)
    elastic = ElasticModel(model, nested_plan(model, (BETA,)), tokenizer=tokenizer,
                           model_id="smollm2-135m-datasvd")
    # the exporter's own check against PyTorch is tests/test_int4.py's; here: og vs ours
    manifest = export(elastic, tmp_path, budgets=[BETA], quantize="int4",
                      config=OnnxExportConfig(validate=False))
    entry = manifest["budgets"][0]
    assert entry["quantization"]["embedding_bits"] == 4
    weights = sum(r["params"] for r in entry["layers"]) + 49152 * 576  # factors + table
    assert entry["bytes"] <= weights * 5 / 8 * 1.05 + 3 * 2**20  # + norms, rotary, graph
    prompt = np.array([tokenizer("The history of the printing press")["input_ids"]], np.int64)
    session = ElasticSession(tmp_path, budget=BETA, threads=2)
    ours = session.generate(prompt, max_new_tokens=STEPS, stop_at_eos=False).token_ids
    theirs = og_greedy((tmp_path / entry["graph"]).parent, prompt, STEPS)
    assert theirs == ours[:len(theirs)] and len(theirs) >= STEPS // 2
    assert len(set(ours)) > 3  # not one repeated token
