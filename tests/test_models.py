"""load_model: accepted forms, clear errors, and the real SmolLM2-135M offline."""

import pytest
import torch
from conftest import tiny_bert, tiny_llama
from transformers import AutoTokenizer

import flexrank
from flexrank.compress.models import ModelLoadError
from flexrank.io import save_tokenizer


def test_module_passthrough():
    model = tiny_llama()
    loaded, tokenizer = flexrank.load_model(model)
    assert loaded is model and tokenizer is None


def test_unknown_alias_lists_accepted_forms():
    with pytest.raises(ModelLoadError, match=r"smollm2-135m.*Hugging Face model folder"):
        flexrank.load_model("no-such-model")


def test_hf_folder_round_trip(tmp_path, tokenizer):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = flexrank.load_model(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok is not None and tok("ab")["input_ids"] == tokenizer("ab")["input_ids"]
    encoder = tiny_bert()
    encoder.save_pretrained(tmp_path / "bert")
    loaded, tok = flexrank.load_model(tmp_path / "bert")
    assert type(loaded).__name__ == "BertModel" and tok is None


def test_folder_without_weights_and_corrupt_weights(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="could not load"):
        flexrank.load_model(tmp_path)
    weights.unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        flexrank.load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        flexrank.load_model(tmp_path)


def test_bad_gguf_files(tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"NOTGGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="GGUF magic"):
        flexrank.load_model(fake)
    fake.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match=r"m\.gguf"):
        flexrank.load_model(fake)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x" * 10)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        flexrank.load_model(other)


@pytest.mark.real_model
def test_real_smollm2_loads_offline_and_knows_paris(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = flexrank.load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    # bundles carry tokenizer.json only (the GGUF-rebuilt slow file is 98 MB), and the
    # saved tokenizer encodes exactly as the loaded one
    save_tokenizer(tokenizer, tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "ROMEO: But soft, what light through yonder window breaks?\n  é 123"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id
