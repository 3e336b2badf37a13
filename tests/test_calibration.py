"""calibration_data: every source, deterministic packing, clear errors."""

import json
import logging

import pytest
import torch
from conftest import SHAKESPEARE, tiny_llama

from flexrank.compress.calibration import CalibrationError, calibration_data, pack


def test_text_file_packs_deterministically(tmp_path, tokenizer):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(200))
    path = tmp_path / "a.txt"
    path.write_text(text)
    a = calibration_data(tokenizer, path, num_samples=10, seq_len=32, seed=3, batch_size=4)
    b = calibration_data(tokenizer, path, num_samples=10, seq_len=32, seed=3, batch_size=4)
    c = calibration_data(tokenizer, path, num_samples=10, seq_len=32, seed=4, batch_size=4)
    assert [x["input_ids"].shape for x in a] == [(4, 32), (4, 32), (2, 32)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
    # every sample is a verbatim window of the tokenised text
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    for row in torch.cat([x["input_ids"] for x in a]).tolist():
        start = [i for i in range(len(stream) - 31) if stream[i:i + 32] == row]
        assert start and start[0] % 32 == 0


def test_pack_windows_are_disjoint_and_span_respected():
    stream = torch.arange(1000)
    out = pack(stream, num_samples=5, seq_len=10, seed=0, span=(0.5, 1.0))
    assert out.min() >= 500 and len(set(out.flatten().tolist())) == 50
    assert torch.all(out[:, 1:] - out[:, :-1] == 1)


def test_jsonl_and_datasets_folder(tmp_path, tokenizer):
    rows = [{"text": f"record {i} says hello world"} for i in range(50)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    from_jsonl = calibration_data(tokenizer, jsonl, num_samples=8, seq_len=16, seed=0)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    from_ds = calibration_data(tokenizer, tmp_path / "ds", num_samples=8, seq_len=16, seed=0)
    assert all(torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(from_jsonl, from_ds, strict=True))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:2 has no string field 'text'"):
        calibration_data(tokenizer, bad, num_samples=1, seq_len=2)


def test_errors_empty_short_and_encoding(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        calibration_data(tokenizer, empty)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    with pytest.raises(CalibrationError, match=r"has 101 tokens .* need 512"):
        calibration_data(tokenizer, short, num_samples=4, seq_len=128)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(CalibrationError, match="not UTF-8"):
        calibration_data(tokenizer, latin)
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_data(tokenizer, tmp_path / "missing.txt")


def test_few_samples_warns(tmp_path, tokenizer, caplog):
    path = tmp_path / "a.txt"
    path.write_text("abc " * 500)
    with caplog.at_level(logging.WARNING):
        calibration_data(tokenizer, path, num_samples=4, seq_len=16)
    assert "recommended" in caplog.text
    caplog.clear()  # held-out text is measured on, not calibrated with: no advice
    with caplog.at_level(logging.WARNING):
        calibration_data(tokenizer, path, num_samples=4, seq_len=16, held_out=True)
    assert "recommended" not in caplog.text


def test_teacher_samples_are_seeded_model_text(tokenizer):
    model = tiny_llama()
    a = calibration_data(tokenizer, "teacher", model=model, num_samples=3, seq_len=12, seed=1,
                         batch_size=2)
    b = calibration_data(tokenizer, "teacher", model=model, num_samples=3, seq_len=12, seed=1,
                         batch_size=2)
    ids = torch.cat([x["input_ids"] for x in a])
    assert ids.shape == (3, 12) and torch.all(ids[:, 0] == tokenizer.bos_token_id)
    assert torch.equal(ids, torch.cat([x["input_ids"] for x in b]))
    with pytest.raises(CalibrationError, match="pass model="):
        calibration_data(tokenizer, "teacher")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared data not beside the checkout")
def test_real_text_split(tokenizer, monkeypatch):
    from flexrank.compress import calibration

    real_token_stream = calibration.token_stream
    streams = {}  # the file is tokenised once (2 s), however often it is packed below

    def token_stream_once(tok, texts):
        key = tuple(texts)
        if key not in streams:
            streams[key] = real_token_stream(tok, texts)
        return streams[key]

    monkeypatch.setattr(calibration, "token_stream", token_stream_once)
    batches = calibration_data(tokenizer, SHAKESPEARE, num_samples=16, seq_len=64,
                               span=(0.0, 0.8))
    assert sum(b["input_ids"].shape[0] for b in batches) == 16
    # The split computed from the file alone: the char tokenizer gives one token per
    # character (id ord(c) - 29 for printable ASCII, 98 for a newline) and EOS (2) closes
    # the document; calibration keeps the first round(0.8 · tokens), held out the rest.
    text = SHAKESPEARE.read_text()
    ids = torch.tensor([98 if c == "\n" else ord(c) - 29 for c in text] + [2])
    cut = round(0.8 * len(ids))
    for span, first, last in [((0.0, 0.8), 0, cut), ((0.8, 1.0), cut, len(ids))]:
        windows = (last - first) // 64
        # asking for every window returns them all, in order: exactly the span's tokens
        every = calibration_data(tokenizer, SHAKESPEARE, num_samples=windows, seq_len=64,
                                 span=span, batch_size=windows)
        assert torch.equal(every[0]["input_ids"].flatten(), ids[first:first + windows * 64])
        with pytest.raises(CalibrationError, match=f"has {last - first} tokens in span"):
            calibration_data(tokenizer, SHAKESPEARE, num_samples=windows + 1, seq_len=64,
                             span=span)
    # the 16 drawn sequences are windows of the calibration part
    calibration_windows = {tuple(ids[s:s + 64].tolist()) for s in range(0, cut - 63, 64)}
    for row in torch.cat([b["input_ids"] for b in batches]).tolist():
        assert tuple(row) in calibration_windows


def test_teacher_calibration_of_a_model_that_cannot_generate_is_refused_by_name():
    from conftest import char_tokenizer, tiny_bert

    bert = tiny_bert()
    with pytest.raises(CalibrationError, match=r"BertModel cannot generate text .*--calib FILE"):
        calibration_data(char_tokenizer(), "teacher", model=bert, num_samples=2, seq_len=8)
    samples = calibration_data(char_tokenizer(), "teacher", model=tiny_llama(), num_samples=2,
                               seq_len=8)  # a causal LM still samples its own text
    assert samples[0]["input_ids"].shape == (2, 8)


def bert_tokenizer(folder):
    """A BertTokenizerFast over a 19-token vocabulary file written here."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "to", "be", "or", "not", "that",
             "is", "the", "question", "whether", "tis", "nobler", "in", "mind", "suffer"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)


def template_tokenizer(folder):
    """The same vocabulary as a generic PreTrainedTokenizerFast whose post-processor adds
    [CLS] … [SEP] (its build_inputs_with_special_tokens adds nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((folder / "vocab.txt").read_text().split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]",
                                   sep_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]",
                                   model_max_length=64)


@pytest.mark.parametrize("kind", ["bert", "template"])
def test_encoder_windows_get_the_tokenizers_special_tokens(tmp_path, capfd, caplog, kind):
    """An encoder (a model that cannot generate) is calibrated on inputs shaped as it is
    deployed: [CLS] + the window that packing the bare text gives + [SEP], seq_len in all
    (also for a generic fast tokenizer whose post-processor adds them); a language model
    keeps windows of running text, as does an encoder whose tokenizer adds nothing.
    Tokenising the whole text as one sequence, longer than the model's positions, says
    nothing."""
    from transformers import BertConfig, BertModel

    tokenizer = bert_tokenizer(tmp_path)
    if kind == "template":
        tokenizer = template_tokenizer(tmp_path)
    text = " ".join(["to be or not to be that is the question"] * 40
                    + ["whether tis nobler in the mind to suffer"] * 40)
    path = tmp_path / "a.txt"
    path.write_text(text)
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)).eval()
    with caplog.at_level(logging.WARNING):
        rows = torch.cat([b["input_ids"] for b in calibration_data(
            tokenizer, path, model=encoder, num_samples=6, seq_len=12, seed=0)])
        held = torch.cat([b["input_ids"] for b in calibration_data(
            tokenizer, path, model=encoder, num_samples=2, seq_len=12, seed=0,
            span=(0.9, 1.0), held_out=True)])
    assert "Token indices sequence length" not in capfd.readouterr().err + caplog.text
    stream = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    assert len(stream) > 64  # longer than the model's positions
    cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    for got, (n, span) in ((rows, (6, (0.0, 1.0))), (held, (2, (0.9, 1.0)))):
        expected = pack(stream, n, 10, 0, span)
        assert torch.equal(got, torch.cat([torch.full((n, 1), cls), expected,
                                           torch.full((n, 1), sep)], 1))
    lm_rows = torch.cat([b["input_ids"] for b in calibration_data(
        tokenizer, path, model=tiny_llama(vocab=len(tokenizer)), num_samples=6,
        seq_len=12, seed=0)])
    assert torch.equal(lm_rows, pack(stream, 6, 12, 0))
    with pytest.raises(CalibrationError, match="seq_len 2 leaves no room for text between "
                                               "the 2 special tokens"):
        calibration_data(tokenizer, path, model=encoder, num_samples=6, seq_len=2)


def test_encoder_windows_stay_text_when_its_tokenizer_adds_nothing(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    path = tmp_path / "a.txt"
    path.write_text("".join(f"line {i}: to be or not to be\n" for i in range(50)))
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)).eval()
    rows = torch.cat([b["input_ids"] for b in calibration_data(
        tokenizer, path, model=encoder, num_samples=4, seq_len=16, seed=1)])
    stream = torch.tensor(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    assert torch.equal(rows, pack(torch.cat([stream, torch.tensor([tokenizer.eos_token_id])]),
                                  4, 16, 1))
