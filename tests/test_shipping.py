"""README "Shipping to an app" made from Python (issue 17), so the instructions cannot rot:
only the files the README's table lists for onnxruntime-genai are copied into an "app"
folder, and onnxruntime-genai's calls of the README (og.Model, its Tokenizer, a Generator
loop) run there; the tokens equal the Hugging Face tokenizer's and PyTorch's greedy ones."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from conftest import SHAKESPEARE, tiny_llama, token_batches
from elastic_fixtures import nested_plan

from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.validate import torch_greedy

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS = 12


def app_files(runtime: str) -> list[str]:
    """The files the README's shipping table lists for `runtime` (its first column)."""
    text = README.read_text()
    section = text[text.index("## Shipping to an app"):]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(runtime):
            return re.findall(r"`([^`]+)`", cells[1])
    raise AssertionError(f"README's shipping table has no row for {runtime}")


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE trained here (onnxruntime-genai's tokenizer reads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()][:2000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    tokenizer = byte_level_tokenizer()
    model = tiny_llama(vocab=len(tokenizer), init_std=0.2)
    factorize_(model, collect_covariances(model, token_batches(len(tokenizer)),
                                          progress=False), progress=False)
    elastic = ElasticModel(model, nested_plan(model), tokenizer, model_id="tiny-bpe")
    dist = tmp_path_factory.mktemp("dist")
    export(elastic, dist, budgets=[0.75])
    app = tmp_path_factory.mktemp("app")
    for name in app_files("onnxruntime-genai"):
        source = dist / "budget-0.75" / name
        if source.exists():  # model.onnx.data only for graphs with external weights
            shutil.copy(source, app / name)
    return app, tokenizer, elastic.set_budget(0.75).model


def test_the_readme_files_run_in_onnxruntime_genai(shipped):
    app, hf, model = shipped
    prompt = "To be, or not to be"
    og_model = og.Model(str(app))  # the README's calls, in Python's names
    og_tokenizer = og.Tokenizer(og_model)
    ids = og_tokenizer.encode(prompt)
    assert [int(i) for i in ids] == hf(prompt, add_special_tokens=False)["input_ids"]
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(ids) + STEPS, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(ids)
    stream, tokens, text = og_tokenizer.create_stream(), [], ""
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        text += stream.decode(tokens[-1])
    with torch.no_grad():
        expected = torch_greedy(model, torch.tensor([list(ids)]), STEPS).reshape(-1).tolist()
    assert tokens == expected[:len(tokens)] and (len(tokens) == STEPS or tokens[-1] == 2)
    assert og_tokenizer.decode(ids) == prompt
    # a random model's tokens need not end on whole UTF-8 characters: the stream holds back
    # a partial one, where Hugging Face writes replacement characters
    assert text.replace("\ufffd", "") in hf.decode(tokens).replace("\ufffd", "") or not text
    assert np.unique(tokens).size > 1  # not one token repeated
