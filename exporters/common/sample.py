"""Sample inputs that every exporter validates its graphs with."""

from __future__ import annotations

import torch
from torch import nn

from flexrank.compress.models import check_positions, max_positions

SAMPLE_TEXT = "To be, or not to be, that is the question:"
SAMPLE_TOKENS = 24  # at most, from the sample text; random ids: 12


def sample_for(kind: str, model: nn.Module, tokenizer, sample_inputs, config):
    """Sample inputs for validation: the caller's, else `config.sample_text` (and its
    reverse) through the tokenizer, else random token ids. Decoders get input_ids (2, T);
    encoders a dict of input_ids, attention_mask (and token_type_ids when taken); vision
    models (ViT: main_input_name pixel_values) {"pixel_values": `pixel_sample`}.

    Raises PositionLimitError when the caller's input_ids, or the program's context
    (`config.max_seq_len`, ExecuTorch), exceed the model's positions; the built sample is
    cut to them."""
    _check_lengths(model, sample_inputs, config)
    if sample_inputs is not None:
        return sample_inputs
    if kind == "module":
        raise ValueError("exporting a plain nn.Module needs sample_inputs (a tensor or a tuple "
                         "of tensors, as the model's forward takes them)")
    if getattr(model, "main_input_name", None) == "pixel_values":
        return {"pixel_values": pixel_sample(model.config)}
    limit = max_positions(model) or SAMPLE_TOKENS
    if tokenizer is not None:
        rows = [tokenizer(text, return_tensors="pt")["input_ids"][0]
                for text in (config.sample_text, config.sample_text[::-1])]
        length = min(SAMPLE_TOKENS, limit, *(len(row) for row in rows))
        ids = torch.stack([row[:length] for row in rows])  # (2, T)
    else:
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (2, min(12, limit)),
                            generator=torch.Generator().manual_seed(0))
    if kind == "decoder":
        return ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in model.forward.__code__.co_varnames:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


DEFAULT_IMAGE_SIZE = 224  # ImageNet's, what ResNet, ViT and ConvNeXt were trained at


def pixel_sample(config, batch: int = 2) -> torch.Tensor:
    """Seeded standard-normal pixel values (batch, num_channels, H, W) at the config's
    image_size (an int or (H, W); 224 for a model that takes any size and names none, such
    as transformers' ResNet): a vision model's normalised input, for validation."""
    size = getattr(config, "image_size", None) or DEFAULT_IMAGE_SIZE
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(batch, config.num_channels, height, width,
                       generator=torch.Generator().manual_seed(0))


def _check_lengths(model: nn.Module, sample_inputs, config) -> None:
    """The sequence lengths an export asks for, against the model's positions."""
    ids = sample_inputs.get("input_ids") if isinstance(sample_inputs, dict) else sample_inputs
    if torch.is_tensor(ids) and ids.dim() == 2 and not ids.is_floating_point():
        check_positions(model, ids.shape[1], f"sample_inputs of {ids.shape[1]} tokens",
                        "pass shorter sample_inputs")
    context = getattr(config, "max_seq_len", None)
    if context is not None:
        check_positions(model, context, f"max_seq_len {context} (the program's context)",
                        "pass ExecutorchExportConfig(max_seq_len=...) no larger than that")
