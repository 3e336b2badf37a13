"""onnxruntime-genai runs every exported decoder budget folder as it is: `og.Model(folder)`
reads the folder's genai_config.json, and its greedy tokens (token ids fed directly, no
og tokenizer) equal PyTorch's and `onnx_greedy`'s, for float32 and int4 budgets. The
int4 PyTorch reference runs the weights decoded from the graph (tests/test_int4.py).
Also: every decoder family of tests/test_architectures.py, and the ORT format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from conftest import char_tokenizer, token_batches
from elastic_fixtures import nested_plan
from test_architectures import FAMILIES, build
from test_int4 import FRACTIONS, deployed_from_graph, int4_llama

from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.validate import torch_greedy
from flexrank.exporters.executorch.validate import at_ranks
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.exporters.onnx.genai import GENAI_CONFIG
from flexrank.runtime.kv_cache import make_session, onnx_greedy

logging.getLogger("optimum").setLevel(logging.ERROR)
STEPS = 16
EOS = 2
PROMPTS = [np.array([[5, 17, 30, 42, 8, 9, 61, 3]], np.int64),
           np.array([[70, 11, 4, 90, 33]], np.int64)]


@pytest.fixture(scope="module")
def llama():
    """Peaked logits (init 0.2), so that greedy tokens vary from step to step."""
    model = int4_llama(init_std=0.2)
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    return ElasticModel(model, nested_plan(model, FRACTIONS), tokenizer=char_tokenizer(),
                        model_id="genai_llama")


def og_greedy(folder: Path, prompt: np.ndarray, steps: int) -> list[int]:
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


def assert_same_greedy(ours: list[int], theirs: np.ndarray):
    """onnxruntime-genai stops at the eos token; the references run all the steps."""
    theirs = [int(t) for t in np.asarray(theirs).reshape(-1)]
    assert ours == theirs[:len(ours)]
    assert len(ours) == len(theirs) or ours[-1] == EOS


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_og_generates_what_pytorch_generates(llama, tmp_path, quantize):
    # int4 at accuracy level 0: MatMulNBits in float32, equal to the decoded weights' model
    manifest = export(llama, tmp_path, quantize=quantize,
                      config=OnnxExportConfig(int4_accuracy_level=0))
    tokens = set()
    for entry in manifest["budgets"]:
        graph = tmp_path / entry["graph"]
        assert f"{graph.parent.name}/{GENAI_CONFIG}" in entry["files"]  # listed and hashed
        if quantize is None:
            with at_ranks(llama.model, entry["ranks"]) as reference:
                tokens |= compare(graph, reference)
        else:
            tokens |= compare(graph, deployed_from_graph(llama, entry, graph,
                                                         check_rounding=True))
    assert len(tokens) > 10  # the comparison is not of one repeated token


def compare(graph: Path, reference) -> set[int]:
    """og's greedy tokens on the budget folder of `graph` against PyTorch's (`reference`)
    and an onnxruntime session's, for every prompt; returns the tokens seen."""
    session, seen = make_session(graph, 1), set()
    for prompt in PROMPTS:
        ours = og_greedy(graph.parent, prompt, STEPS)
        with torch.no_grad():
            assert_same_greedy(ours, torch_greedy(reference, torch.from_numpy(prompt), STEPS))
        assert_same_greedy(ours, onnx_greedy(session, prompt, STEPS))
        seen |= set(ours)
    return seen


def test_og_runs_the_default_int4_graph(llama, tmp_path):
    """accuracy level 4 (int8 activation blocks): onnxruntime-genai's tokens are those of
    an onnxruntime session on the same graph."""
    manifest = export(llama, tmp_path, budgets=[0.7], quantize="int4")
    graph = tmp_path / manifest["budgets"][0]["graph"]
    session = make_session(graph, 1)
    for prompt in PROMPTS:
        assert_same_greedy(og_greedy(graph.parent, prompt, STEPS),
                           onnx_greedy(session, prompt, STEPS))


def test_genai_config_fields(llama, tmp_path):
    manifest = export(llama, tmp_path, budgets=[0.4], config=OnnxExportConfig(validate=False))
    entry = manifest["budgets"][0]
    config = json.loads((tmp_path / entry["graph"]).with_name(GENAI_CONFIG).read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    # the tiny Llama of tests/test_int4.py: hidden 128, 4 heads of 32, 2 KV heads, 2 layers
    assert (decoder["hidden_size"], decoder["num_attention_heads"], decoder["head_size"],
            decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (128, 4, 32, 2, 2)
    assert decoder["filename"] == "model.onnx"
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids",
                                 "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert (model["type"], model["vocab_size"], model["context_length"]) == ("llama", 100, 128)
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 2)
    search = config["search"]
    assert search["do_sample"] is False and search["num_beams"] == 1
    assert search["max_length"] == 128
    assert search["past_present_share_buffer"] is entry["kv_cache_in_place"] is True


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_og_runs_every_decoder_family(family, tmp_path):
    """The families of tests/test_architectures.py: og's greedy tokens are an onnxruntime
    session's on the same graph (the exporter checked that graph against PyTorch)."""
    manifest = export(build(family), tmp_path, budgets=[0.5],
                      config=OnnxExportConfig(validate=False))
    graph = tmp_path / manifest["budgets"][0]["graph"]
    session = make_session(graph, 1)
    for prompt in PROMPTS:
        assert_same_greedy(og_greedy(graph.parent, prompt, 8), onnx_greedy(session, prompt, 8))


def test_og_runs_the_ort_format(llama, tmp_path):
    manifest = export(llama, tmp_path, format="ort", budgets=[0.7], quantize="int4")
    graph = tmp_path / manifest["budgets"][0]["graph"]
    assert graph.suffix == ".ort"
    config = json.loads(graph.with_name(GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["filename"] == "model.ort"
    session = make_session(graph, 1)
    for prompt in PROMPTS:
        assert_same_greedy(og_greedy(graph.parent, prompt, STEPS),
                           onnx_greedy(session, prompt, STEPS))
