"""ExecuTorch's own LLM runner runs our programs as they are (issue 16):
`executorch.extension.llm.runner.TextLLMRunner` (the C++ runner behind ExecuTorch's
Android/iOS demo apps) loads a bundle's `model.pte` with the bundle's `tokenizer.json`,
reads the metadata methods ExecuTorch's LLM export writes, and its greedy text equals
the eager PyTorch model's: the float model at the exported ranks, and for 8da4w the same
model quantized by torchao in PyTorch (not the exporter's report of itself)."""

from __future__ import annotations

import pytest
import torch
from conftest import token_batches
from elastic_fixtures import nested_plan
from test_executorch_8da4w import random_norms_

import flexrank.exporters.executorch.export  # noqa: F401  (registers "executorch")
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.forms import deployable_model, quantized_policy
from flexrank.exporters.executorch.export import ExecutorchExportConfig
from flexrank.exporters.executorch.quant import linear_forms_, quantize_8da4w_
from flexrank.exporters.executorch.validate import at_ranks, constant_methods

pytest.importorskip("executorch.extension.llm.runner")

NEW_TOKENS = 12
PROMPTS = ("to be or not", "the quick brown fox")
TEXT = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the "
        "question", "all the world's a stage, and all the men and women merely players"]


def ascii_bpe():
    """A byte-level BPE tokenizer (the kind SmolLM2 ships) of 200 tokens trained here on
    ASCII text only, so every token decodes to valid UTF-8 on its own (the runner hands
    each piece to Python as a str). Its normalizer and decoder are those of SmolLM2's
    tokenizer.json as transformers rebuilds it from the GGUF file: an empty normalizer
    Sequence, which ExecuTorch's tokenizer loader refuses until the exporter writes null
    (`runner_readable_tokenizer_`), and the SentencePiece-style decoder Sequence."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Replace("\u2581", " "), decoders.ByteLevel()])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(TEXT * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def elastic():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = ascii_bpe()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    # RMSNorm weights of a trained model, not exactly 1: with unit weights the 8-bit
    # embedding's rows stay on a lattice and layer 0's int8 activations meet exact
    # rounding ties, which two correct runtimes break differently (test_executorch_8da4w)
    random_norms_(model)
    batches = token_batches(vocab, num=16)
    factorize_(model, collect_covariances(model, batches, progress=False), progress=False)
    return ElasticModel(model, nested_plan(model, (0.5, 1.0)), tokenizer=tokenizer,
                        model_id="tiny-bpe")


def runner_text(folder, prompt: str) -> str:
    import executorch.kernels.quantized  # noqa: F401  (8da4w's quantized embedding op)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    data = folder / "model.ptd"  # a tied float table's program keeps its weights there
    runner = TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"),
                           str(data) if data.is_file() else None)
    pieces = []
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=NEW_TOKENS,
                                             temperature=0.0), token_callback=pieces.append)
    return "".join(pieces)


@torch.no_grad()
def eager_text(model, tokenizer, prompt: str) -> str:
    """Greedy decoding in PyTorch, full forward each step (no cache), stopping at EOS as
    the runner does: the runner hands the EOS token's text to the callback too, then
    stops."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    new = []
    for _ in range(NEW_TOKENS):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        new.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=False)


def eager_8da4w(elastic, ranks, config):
    """The same model quantized by torchao in PyTorch: the exported ranks' forms, 8da4w."""
    deployed, _ = deployable_model(elastic.model, ranks, policy=quantized_policy(config.forms))
    linear_forms_(deployed)
    quantize_8da4w_(deployed, list(ranks), config.group_size, config.embedding_bits)
    return deployed


def test_runner_reads_the_llm_export_metadata(elastic, tmp_path):
    manifest = export(elastic, tmp_path, format="executorch", budgets=[0.5],
                      config=ExecutorchExportConfig(max_seq_len=64, validate=False))
    metadata = constant_methods(tmp_path / manifest["budgets"][0]["graph"])
    # the names ExecuTorch's export_llama writes (_load_llama_model_metadata) and the
    # runner reads (llm_runner_helper.cpp), with the values of this model
    assert {"get_max_seq_len": 64, "get_max_context_len": 64, "get_vocab_size": len(
        elastic.tokenizer), "get_n_layers": 2, "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
        "get_bos_id": 1}.items() <= metadata.items()
    assert metadata["get_eos_ids"] in (2, [2])


@pytest.mark.parametrize("quantize", [None, "8da4w"])
def test_runner_generates_the_eager_models_greedy_text(elastic, tmp_path, quantize):
    config = ExecutorchExportConfig(max_seq_len=64)
    manifest = export(elastic, tmp_path, format="executorch", quantize=quantize,
                      config=config)
    tokenizer = elastic.tokenizer
    for entry in manifest["budgets"]:
        folder = (tmp_path / entry["graph"]).parent
        for prompt in PROMPTS:
            if quantize is None:
                with at_ranks(elastic.model, entry["ranks"]) as model:
                    expected = eager_text(model, tokenizer, prompt)
            else:
                expected = eager_text(eager_8da4w(elastic, entry["ranks"], config),
                                      tokenizer, prompt)
            assert len(expected) > 0
            assert runner_text(folder, prompt) == expected, (entry["beta"], prompt)
