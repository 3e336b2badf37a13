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
from conftest import SHAKESPEARE, char_tokenizer, token_batches
from elastic_fixtures import nested_plan
from test_architectures import FAMILIES, build
from test_int4 import FRACTIONS, deployed_from_graph, int4_llama
from transformers import AutoTokenizer

from flexrank.compress.aliases import DEFAULT_MODEL
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.models import alias_path
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.validate import torch_greedy
from flexrank.exporters.executorch.validate import at_ranks
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.exporters.onnx.genai import GENAI_CONFIG, og_readable_tokenizer_
from flexrank.formats import RANK_LEVEL
from flexrank.io import save_tokenizer
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


def og_greedy(folder: Path, prompt: np.ndarray, steps: int, filename: str | None = None,
              rank_level: int | None = None) -> list[int]:
    """og's greedy tokens on the model of `folder`'s genai_config.json, or on the graph
    `filename` of that folder through a config overlay (the shared layout's budgets), with
    the elastic graph's `rank_level` input set when given (the elastic layout's budgets)."""
    config = og.Config(str(folder))
    if filename is not None:
        config.overlay(json.dumps({"model": {"decoder": {"filename": filename}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + steps, do_sample=False)
    generator = og.Generator(model, params)
    if rank_level is not None:
        generator.set_model_input(RANK_LEVEL, np.array([rank_level], np.int64))
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


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_og_runs_every_budget_of_the_shared_layout(llama, tmp_path, quantize):
    """One genai_config.json in the shared folder (the largest budget's, listed and hashed
    for every budget); each budget's graph runs from it with a filename overlay: og's
    greedy tokens are PyTorch's at the budget's ranks (float) and an onnxruntime session's
    on the same graph."""
    config = OnnxExportConfig(int4_accuracy_level=0, validate=False)
    manifest = export(llama, tmp_path, layout="shared", quantize=quantize, config=config)
    folder = tmp_path / "shared"
    written = json.loads((folder / GENAI_CONFIG).read_text())
    assert written["model"]["decoder"]["filename"] == "model-budget-1.onnx"
    tokens = set()
    for entry in manifest["budgets"]:
        assert f"shared/{GENAI_CONFIG}" in entry["files"]
        graph = tmp_path / entry["graph"]
        session = make_session(graph, 1)
        for prompt in PROMPTS:
            ours = og_greedy(folder, prompt, STEPS, graph.name)
            assert_same_greedy(ours, onnx_greedy(session, prompt, STEPS))
            if quantize is None:
                with at_ranks(llama.model, entry["ranks"]) as reference, torch.no_grad():
                    assert_same_greedy(ours, torch_greedy(reference, torch.from_numpy(prompt),
                                                          STEPS))
            tokens |= set(ours)
    assert len(tokens) > 10


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_og_runs_every_budget_of_the_elastic_layout(llama, tmp_path, quantize):
    """One graph for every budget: og.Model(elastic/) reads its genai_config.json, and
    `generator.set_model_input("rank_level", [level])` picks the budget; og's greedy tokens
    are PyTorch's at the budget's ranks (float) and an onnxruntime session's fed the same
    level, and they differ between budgets."""
    config = OnnxExportConfig(int4_accuracy_level=0, validate=False)
    manifest = export(llama, tmp_path, layout="elastic", quantize=quantize, config=config)
    folder = tmp_path / "elastic"
    written = json.loads((folder / GENAI_CONFIG).read_text())
    assert written["model"]["decoder"]["filename"] == "model.onnx"
    session = make_session(folder / "model.onnx", 1)
    by_level = {}
    for entry in manifest["budgets"]:
        assert f"elastic/{GENAI_CONFIG}" in entry["files"]
        level = entry["rank_level"]
        for prompt in PROMPTS:
            ours = og_greedy(folder, prompt, STEPS, rank_level=level)
            assert_same_greedy(ours, onnx_greedy(session, prompt, STEPS,
                                                 {RANK_LEVEL: np.array([level], np.int64)}))
            if quantize is None:
                with at_ranks(llama.model, entry["ranks"]) as reference, torch.no_grad():
                    assert_same_greedy(ours, torch_greedy(reference, torch.from_numpy(prompt),
                                                          STEPS))
            by_level.setdefault(level, []).extend(ours)
    assert len({tuple(tokens) for tokens in by_level.values()}) > 1  # the level is read


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


def test_context_tokens_bound_what_og_holds(llama, tmp_path):
    """`context_tokens` (a device profile's context) is what og's generator holds by
    default: with the folder's own search options it stops at that many tokens, prompt
    included, on the tokens an onnxruntime session gives; above the model's context it is
    the model's."""
    manifest = export(llama, tmp_path / "short", budgets=[0.4],
                      config=OnnxExportConfig(validate=False, context_tokens=20))
    graph = tmp_path / "short" / manifest["budgets"][0]["graph"]
    assert json.loads(graph.with_name(GENAI_CONFIG).read_text())["search"]["max_length"] == 20
    prompt = PROMPTS[0]
    model = og.Model(str(graph.parent))
    generator = og.Generator(model, og.GeneratorParams(model))  # the config's defaults
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    reference = onnx_greedy(make_session(graph, 1), prompt, 20 - prompt.shape[1])
    assert_same_greedy(tokens, reference)
    assert len(tokens) == 20 - prompt.shape[1] or tokens[-1] == EOS

    manifest = export(llama, tmp_path / "long", budgets=[0.4],
                      config=OnnxExportConfig(validate=False, context_tokens=4096))
    config = json.loads((tmp_path / "long" / manifest["budgets"][0]["graph"])
                        .with_name(GENAI_CONFIG).read_text())
    assert config["search"]["max_length"] == config["model"]["context_length"] == 128
    with pytest.raises(ValueError, match="context_tokens 1 must be at least 2"):
        OnnxExportConfig(context_tokens=1)


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


# onnxruntime-genai's tokenizer needs a genai_config.json beside the tokenizer files
TOKENIZER_ONLY_CONFIG = {"model": {"type": "llama", "vocab_size": 49152, "context_length": 2048,
                                   "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                                   "decoder": {"filename": "model.onnx", "head_size": 64,
                                               "hidden_size": 576, "num_attention_heads": 9,
                                               "num_hidden_layers": 30,
                                               "num_key_value_heads": 3}},
                         "search": {}}


def shakespeare_lines(count: int) -> list[str]:
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()]
    return lines[:count]


def assert_og_encodes_like(hf, folder: Path, texts: list[str]):
    """og.Tokenizer on `folder` gives the Hugging Face tokenizer's ids for every text (og
    adds no special tokens), and decodes them back to the text."""
    (folder / GENAI_CONFIG).write_text(json.dumps(TOKENIZER_ONLY_CONFIG))
    tokenizer = og.Tokenizer(str(folder))
    for text in texts:
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert [int(i) for i in tokenizer.encode(text)] == expected, text
        assert tokenizer.decode(expected) == text


def spm_decoder_byte_level_bpe(folder: Path):
    """A byte-level BPE trained here on Shakespeare, saved as transformers saves SmolLM2's
    tokenizer rebuilt from GGUF: a SentencePiece decoder's steps, class LlamaTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(shakespeare_lines(2000), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Replace("\u2581", " "), decoders.ByteLevel()])
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    save_tokenizer(hf, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return hf


def test_og_tokenizer_reads_a_byte_level_bpe_with_spm_decoder_steps(tmp_path):
    hf = spm_decoder_byte_level_bpe(tmp_path)
    lines = shakespeare_lines(300)
    (tmp_path / GENAI_CONFIG).write_text(json.dumps(TOKENIZER_ONLY_CONFIG))
    # as saved, og reads it as SentencePiece: spaces become "▁", which has no id
    assert -1 in [int(i) for i in og.Tokenizer(str(tmp_path)).encode(lines[0] + " x")]
    assert og_readable_tokenizer_(tmp_path) == ["tokenizer.json: decoder ByteLevel",
                                                "tokenizer_config.json: tokenizer_class "
                                                "GPT2Tokenizer"]
    assert not og_readable_tokenizer_(tmp_path)  # already fixed: left alone
    assert_og_encodes_like(hf, tmp_path, lines + ["\n".join(lines[:50])])
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # Hugging Face's view unchanged
    for text in lines[:50]:
        ids = hf(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids and reloaded.decode(ids) == hf.decode(ids)


@pytest.mark.real_model
def test_og_tokenizer_reads_smollm2_like_hugging_face(tmp_path):
    """SmolLM2's tokenizer (the GGUF alias, the tokenizer alone): og's ids on a few
    hundred lines of Shakespeare equal Hugging Face's."""
    gguf = alias_path(DEFAULT_MODEL)
    hf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_tokenizer(hf, tmp_path)
    (tmp_path / GENAI_CONFIG).write_text(json.dumps(TOKENIZER_ONLY_CONFIG))
    issue = "The history of the printing press"  # 504, -1, -1, -1, ... as saved
    assert -1 in [int(i) for i in og.Tokenizer(str(tmp_path)).encode(issue)]
    assert len(og_readable_tokenizer_(tmp_path)) == 2
    lines = shakespeare_lines(300)
    assert_og_encodes_like(hf, tmp_path, lines + ["\n".join(lines[:50]), issue])
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # Hugging Face's view unchanged
    text = "\n".join(lines[:50])
    ids = hf(text)["input_ids"]
    assert reloaded(text)["input_ids"] == ids and reloaded.decode(ids) == hf.decode(ids)
