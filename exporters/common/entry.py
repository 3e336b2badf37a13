"""One budget of an export: its folder name, the PyTorch model at that budget, and its
manifest entry (files, bytes, parameters, layer forms, validation)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from flexrank.compress.depth_layers import deployed_depth, depth_at
from flexrank.compress.select import nested_layers
from flexrank.exporters.common.forms import LayerExport
from flexrank.manifest import BudgetEntry, json_ready


def budget_name(beta: float) -> str:
    return f"budget-{beta:g}"


@contextmanager
def at_budget(elastic, beta: float):
    """The PyTorch model at `beta`; the layers' previous ranks (and a joint plan's block
    switches) are restored afterwards."""
    layers = nested_layers(elastic.model)
    previous = {name: layer.rank for name, layer in layers.items()}
    previous_budget = getattr(elastic, "budget", None)
    with depth_at(elastic.model, getattr(elastic, "plan", None), beta):
        elastic.set_budget(beta)
        try:
            yield elastic.model
        finally:
            for name, rank in previous.items():
                layers[name].rank = rank
            if hasattr(elastic, "budget"):
                elastic.budget = previous_budget


def other_params(model, exclude: frozenset[int] = frozenset()) -> int:
    """Parameters outside the nested layers (embeddings, norms, a tied head counted once),
    but those whose id is in `exclude`."""
    nested = {id(p) for layer in nested_layers(model).values() for p in layer.parameters()}
    return sum(p.numel() for p in model.parameters()
               if id(p) not in nested and id(p) not in exclude)


def _with_depth(elastic, beta, records: list) -> tuple[list, frozenset[int]]:
    """Under a joint plan (issue 18): the records without the replaced blocks' layers,
    plus one "shared" record per active stand-in layer (adapter + output scale; its donor's
    weights are counted in the donor), and the parameter ids the budget does not store
    besides (`deployed_depth`). Unchanged records and no ids otherwise."""
    depth = deployed_depth(elastic.model, elastic.plan, beta)
    if depth is None:
        return records, frozenset()
    kept = [r for r in records if depth.deploys(r.name)]
    shared = [LayerExport(s.name, s.shape, s.rank, "shared", None, s.params)
              for s in depth.stand_in_layers]
    return kept + shared, depth.idle


# What the manifest's `kept` (= β) is a fraction of, written beside it.
KEPT_OF = "deployed parameters of the factorised layers (embeddings, norms, head excluded)"


def make_budget_entry(elastic, beta, records, files, out_dir: Path, validation,
                      **extra) -> BudgetEntry:
    """The manifest entry of budget `beta`: `files` (paths under `out_dir`) with their
    total size, parameter counts and forms from the layer `records`, the `validation`
    report, and `extra` fields of the format (`graph`, `kv_cache_in_place`, ...; see
    `flexrank.manifest.BudgetEntry`)."""
    # β's dense reference: every nested layer, replaced or not (as the joint plan's)
    dense = sum(r.shape[0] * r.shape[1] for r in records)
    records, idle = _with_depth(elastic, beta, records)
    factorised = sum(r.params for r in records)
    other = other_params(elastic.model, idle)
    paths = sorted({f.relative_to(out_dir).as_posix() for f in files})
    return BudgetEntry(**json_ready({
        "beta": beta,
        "files": paths,
        "bytes": sum((out_dir / p).stat().st_size for p in paths),
        # β counts the factorised layers only (DESIGN.md §3); the whole model keeps more
        "params": {"kept_of": KEPT_OF,
                   "factorised": factorised, "factorised_dense": dense,
                   "kept": factorised / dense if dense else 1.0,
                   "other": other,
                   "whole_model": factorised + other, "whole_model_dense": dense + other,
                   "whole_model_kept": (factorised + other) / (dense + other)
                   if dense + other else 1.0},
        "forms": {form: sum(r.form == form for r in records)
                  for form in sorted({r.form for r in records})},
        "ranks": {r.name: r.rank for r in records},
        "layers": [r.to_dict() for r in records],
        "validation": validation,
        **extra,
    }))
