"""Which layers FlexRank factorises: one generic walk, no per-architecture tables."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from flexrank.compress.layers import NESTED_TYPES, is_transposed_conv1d

FilterFn = Callable[[str, nn.Module], bool]


def is_factorizable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_transposed_conv1d(module):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


def model_embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input token embedding, output embedding / LM head) of a transformers model, None
    for each it lacks: a vision model (ResNet) has none, and transformers raises
    NotImplementedError from get_input_embeddings instead of returning None."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            found.append(get() if callable(get) else None)
        except (NotImplementedError, AttributeError):
            found.append(None)
    return found[0], found[1]


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the LM head (and of anything sharing the input embedding's weight)."""
    heads = set()
    emb, out = model_embeddings(model)
    emb_weight = getattr(emb, "weight", None)
    for name, module in model.named_modules():
        if module is out and out is not None:
            heads.add(name)
        weight = getattr(module, "weight", None)
        if emb_weight is not None and module is not emb and weight is emb_weight:
            heads.add(name)
    return heads


def find_targets(model: nn.Module, filter_fn: FilterFn | None = None,
                 include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Ordered {qualified name: module} of the layers to factorise (forward order of
    registration). The LM head is skipped unless `include_lm_head`; `filter_fn(name, module)`
    returning False skips a layer."""
    excluded = set() if include_lm_head else output_embedding_names(model)
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, NESTED_TYPES) or not is_factorizable(module):
            continue
        if name in excluded or (filter_fn is not None and not filter_fn(name, module)):
            continue
        targets[name] = module
    return targets


def nested_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Ordered {name: nested layer} of a factorised model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NESTED_TYPES)}
