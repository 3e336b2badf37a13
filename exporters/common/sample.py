"""Sample inputs that every exporter validates its graphs with."""

from __future__ import annotations

import torch
from torch import nn

SAMPLE_TEXT = "To be, or not to be, that is the question:"


def sample_for(kind: str, model: nn.Module, tokenizer, sample_inputs, config):
    """Sample inputs for validation: the caller's, else `config.sample_text` (and its
    reverse) through the tokenizer, else random token ids. Decoders get input_ids (2, T);
    encoders a dict of input_ids, attention_mask (and token_type_ids when taken)."""
    if sample_inputs is not None:
        return sample_inputs
    if kind == "module":
        raise ValueError("exporting a plain nn.Module needs sample_inputs (a tensor or a tuple "
                         "of tensors, as the model's forward takes them)")
    if tokenizer is not None:
        rows = [tokenizer(text, return_tensors="pt")["input_ids"][0]
                for text in (config.sample_text, config.sample_text[::-1])]
        length = min(24, *(len(row) for row in rows))
        ids = torch.stack([row[:length] for row in rows])  # (2, T)
    else:
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    if kind == "decoder":
        return ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in model.forward.__code__.co_varnames:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs
