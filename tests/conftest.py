"""Tiny random models built in code (Llama, GPT-2, BERT, ViT, a CNN) and a char tokenizer,
so unit tests run in seconds with no download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


def tiny_llama(seed: int = 0, vocab: int = 100, init_std: float = 0.02):
    """init_std ~0.2 gives peaked outputs, so that truncation visibly hurts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=init_std)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 100):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, vocab: int = 100):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    return BertModel(config).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return ViTModel(config).eval()


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.seq = nn.Conv1d(24, 20, 3, padding=1)
        self.head = nn.Linear(20, 10)

    def forward(self, x):  # (B, 3, H, W)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))  # (B, 24, H/2, W/2)
        x = x.flatten(2)  # (B, 24, L)
        x = torch.relu(self.seq(x)).mean(-1)  # (B, 20)
        return self.head(x)


def tiny_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return TinyCNN().eval()


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids 3..), built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """PyTorch's OpenMP threads busy-wait; alternating with onnxruntime (or other jobs) on a
    2-core machine made tiny forwards up to 70x slower. Tiny models need one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tokenizer():
    return char_tokenizer()


def token_batches(vocab: int, num: int = 4, batch: int = 4, seq: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(3, vocab, (batch, seq), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A saved elastic checkpoint of the tiny Llama (budgets 0.6/0.8/1.0, a char tokenizer),
    read-only for the tests that export or measure it."""
    from elastic_fixtures import tiny_elastic

    from flexrank.compress.elastic import ElasticModel

    student, _, plan, _, _ = tiny_elastic()
    folder = tmp_path_factory.mktemp("ckpt")
    ElasticModel(student, plan, char_tokenizer(), model_id="tiny-llama").save_pretrained(folder)
    return folder


@pytest.fixture
def slower_onnxruntime(monkeypatch):
    """Give onnxruntime/cpu its own (lower) factors: the shipped a-priori factors are the
    same for both runtimes (flexrank.device.predict), which would hide a mix-up."""
    from flexrank.device import predict as predict_module
    from flexrank.device.predict import Efficiency

    for key in [k for k in predict_module.DEFAULT_EFFICIENCY if k[0] == "onnxruntime"]:
        monkeypatch.setitem(predict_module.DEFAULT_EFFICIENCY, key,
                            Efficiency(0.3, 0.25, 80e-6, "test: onnxruntime fp32"))
    for key in [k for k in predict_module.QUANTIZED_EFFICIENCY if k[0] == "onnxruntime"]:
        monkeypatch.setitem(predict_module.QUANTIZED_EFFICIENCY, key,
                            Efficiency(0.3, 0.25, 80e-6, "test: onnxruntime quantized",
                                       compute_scale=4.0))
