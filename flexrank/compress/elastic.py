"""`ElasticModel`: one set of nested factors plus the plan that says, per budget, how many
columns each layer keeps. Saved as a folder every exporter reads:

    config.json, tokenizer files        the base model (Hugging Face models)
    flexrank-elastic.safetensors        all weights, factors at max rank, tied tensors once
    flexrank-plan.json                  the NestedPlan, or a JointPlan (depth axis, issue 18)
    flexrank-elastic.json               format version, model id, nested layer structure

`from_pretrained` rebuilds the module from its config alone (no original model needed);
for a bare `nn.Module` pass a skeleton of the same architecture as `model=`. Under a
JointPlan the stand-ins' modules are rebuilt from the plan (`depth_switches_`: donors
linked by reference, so their weights are stored once) before the weights load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from flexrank.budget import match_budget
from flexrank.compress.depth_layers import apply_depth_, depth_switches_
from flexrank.compress.layers import NestedConv1d, NestedConv2d, NestedLinear
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import swap_modules_
from flexrank.io import atomic_dir, save_tokenizer, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "flexrank-elastic.safetensors"
PLAN_FILE = "flexrank-plan.json"
META_FILE = "flexrank-elastic.json"


class BudgetError(ValueError):
    """A budget that the plan does not contain."""


def _layer_spec(layer: nn.Module) -> dict:
    spec = {"kind": type(layer).__name__, "max_rank": layer.max_rank,
            "bias": layer.bias is not None}
    if isinstance(layer, NestedLinear):
        spec.update(in_features=layer.in_features, out_features=layer.out_features)
    else:
        spec.update(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                    padding=list(layer.padding), dilation=list(layer.dilation))
    return spec


def _empty_layer(spec: dict) -> nn.Module:
    if spec["kind"] == "NestedLinear":
        return NestedLinear(spec["in_features"], spec["out_features"], spec["max_rank"],
                            spec["bias"])
    conv_type = {"NestedConv1d": nn.Conv1d, "NestedConv2d": nn.Conv2d}[spec["kind"]]
    nested_type = {"NestedConv1d": NestedConv1d, "NestedConv2d": NestedConv2d}[spec["kind"]]
    conv = conv_type(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                     tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]),
                     bias=spec["bias"])
    return nested_type(conv, spec["max_rank"])


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """{name: structure} of every nested layer: enough to rebuild empty ones."""
    return {name: _layer_spec(layer) for name, layer in nested_layers(model).items()}


def restructure_(model: nn.Module, specs: dict[str, dict]) -> nn.Module:
    """Swap the named layers of a fresh model for empty nested layers (weights to load).

    Raises ValueError naming the layers `specs` lists that `model` does not have.
    """
    swapped = set()

    def replace(name: str, _module: nn.Module) -> nn.Module | None:
        if name not in specs:
            return None
        swapped.add(name)
        return _empty_layer(specs[name])

    swap_modules_(model, replace)
    missing = sorted(set(specs) - swapped)
    if missing:
        raise ValueError(f"the checkpoint names {len(missing)} layers that a fresh "
                         f"{type(model).__name__} does not have (e.g. {missing[:3]}): the "
                         "checkpoint was made from another architecture")
    return model


class ElasticModel:
    def __init__(self, model: nn.Module, plan, tokenizer=None, model_id: str = "custom",
                 qat: dict | None = None):
        self.model = model
        # quantization-aware training: {"scheme": "int4" | "8da4w", "block_size"}; None: float
        self.qat = qat
        self.plan = plan
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.layers = nested_layers(model)
        if not self.layers:
            raise ValueError("the model has no nested layers: run flexrank.factorize_ first")
        missing = sorted(set(plan.layer_names) - set(self.layers))
        if missing:
            raise ValueError(f"the plan names {len(missing)} layers the model does not have "
                             f"(e.g. {missing[:3]}): plan and model do not match")
        for budget in plan.budgets:
            for name, rank in plan.ranks_for(budget).items():
                if rank > self.layers[name].max_rank:
                    raise ValueError(f"plan keeps rank {rank} of {name} at β={budget}, above "
                                     f"its max rank {self.layers[name].max_rank}")
        self.budget: float | None = None

    @property
    def budgets(self) -> list[float]:
        return list(self.plan.budgets)

    def _match_budget(self, beta: float) -> float:
        return match_budget(beta, self.plan.budgets, error=BudgetError)

    def layer_ranks(self, beta: float) -> dict[str, int]:
        """{layer: rank} at `beta`; layers the plan does not name stay at max rank."""
        ranks = {name: layer.max_rank for name, layer in self.layers.items()}
        ranks.update(self.plan.ranks_for(self._match_budget(beta)))
        return ranks

    def set_budget(self, beta: float) -> ElasticModel:
        for name, rank in self.layer_ranks(beta).items():
            self.layers[name].rank = rank
        if hasattr(self.plan, "adapter_ranks"):  # a joint plan (issue 18): blocks switch too
            apply_depth_(self.model, self.plan, beta)
        self.budget = self._match_budget(beta)
        return self

    # ---- persistence ------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the folder atomically: a crash leaves the previous folder (or none)."""
        directory = Path(directory)
        meta = {
            "format": "flexrank-elastic",
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "model_class": type(self.model).__name__,
            "layers": layer_specs(self.model),
        }
        if self.qat:
            meta["qat"] = self.qat
        with atomic_dir(directory) as tmp:
            config = getattr(self.model, "config", None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(tmp)
            if self.tokenizer is not None:
                save_tokenizer(self.tokenizer, tmp)
            save_safetensors_model(self.model, str(tmp / WEIGHTS_FILE))
            self.plan.save(tmp / PLAN_FILE)
            write_json_atomic(tmp / META_FILE, meta)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | None = None,
                        ) -> ElasticModel:
        directory = resolve_elastic_dir(Path(directory))
        meta = read_meta(directory)
        for name in (WEIGHTS_FILE, PLAN_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a complete "
                                        "FlexRank elastic checkpoint")
        plan = _load_plan(directory / PLAN_FILE)  # before the weights: a damaged plan fails fast
        tokenizer = None
        if model is None:
            model, tokenizer = _skeleton_from_config(directory, meta["model_class"])
        restructure_(model, meta["layers"])
        if hasattr(plan, "adapter_ranks"):  # a joint plan: its stand-ins' skeletons, to load
            try:
                depth_switches_(model, plan)
            except ValueError as err:
                raise ValueError(f"{directory / PLAN_FILE} does not fit the checkpoint's "
                                 f"model ({err}); {REMAKE}") from None
        stored = _stored_float_dtype(directory / WEIGHTS_FILE)
        if stored is not None:  # a bf16 checkpoint loads as bf16, not upcast to the default
            model.to(stored)
        try:
            missing, unexpected = load_safetensors_model(model, str(directory / WEIGHTS_FILE),
                                                         strict=False)
        except Exception as err:
            raise ValueError(f"could not read {directory / WEIGHTS_FILE}: {err} "
                             "(truncated or corrupt?)") from err
        if unexpected or [k for k in missing if not _is_tied(model, k)]:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not match the model: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        model.eval()
        try:
            return cls(model, plan, tokenizer, meta.get("model_id", "custom"), meta.get("qat"))
        except ValueError as err:  # a plan edited by hand or taken from another checkpoint
            raise ValueError(f"{directory / PLAN_FILE} does not fit the checkpoint's layers "
                             f"({err}); {REMAKE}") from None


# What to do about a damaged or incomplete checkpoint folder.
REMAKE = ("restore the file from a copy, or re-create the checkpoint with `flexrank compress` "
          "(run again with the same -o, it resumes and rewrites the checkpoint)")


def _load_plan(path: Path):
    """The plan in `path`: a NestedPlan ("format": "flexrank-plan") or, for a depth-elastic
    checkpoint, a JointPlan ("flexrank-joint-plan"). Raises ValueError naming the file for
    a damaged one (JSON syntax, another format, a missing field, a bad value)."""
    from flexrank.planning.depth import JointPlan
    from flexrank.planning.planner import NestedPlan

    try:
        data = json.loads(path.read_text())
        kind = data.get("format") if isinstance(data, dict) else None
        if kind == "flexrank-joint-plan":
            return JointPlan.from_dict(data)
        if kind != "flexrank-plan":
            raise ValueError(f"format {kind!r} is neither 'flexrank-plan' nor "
                             "'flexrank-joint-plan'")
        return NestedPlan.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:  # JSON syntax, a missing field, a bad value
        raise ValueError(f"{path} is damaged or was edited by hand ({type(err).__name__}: "
                         f"{err}); {REMAKE}") from None


def missing_meta_message(directory: Path) -> str | None:
    """The error for a folder (or its elastic/) that holds an elastic checkpoint's weights or
    plan but not its metadata file, which a model loader would take for a plain model with
    no weights; None when that is not the case."""
    for folder in (directory, directory / "elastic"):
        present = [name for name in (WEIGHTS_FILE, PLAN_FILE) if (folder / name).is_file()]
        if present and not (folder / META_FILE).is_file():
            return (f"{folder / META_FILE} is missing: {folder} holds a FlexRank elastic "
                    f"checkpoint ({', '.join(present)}) without its metadata; {REMAKE}")
    return None


def resolve_elastic_dir(directory: Path) -> Path:
    """A `flexrank compress` output folder keeps its checkpoint in elastic/."""
    if not (directory / META_FILE).is_file() and (directory / "elastic" / META_FILE).is_file():
        return directory / "elastic"
    return directory


def read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(missing_meta_message(directory) or
                                f"{path} is missing: {directory} is not a FlexRank elastic "
                                "checkpoint (run `flexrank compress` to make one)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is damaged, not valid JSON ({err}); {REMAKE}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds JSON but not a FlexRank elastic checkpoint's "
                         f"metadata (an object); {REMAKE}")
    if meta.get("format") != "flexrank-elastic" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')} v{meta.get('format_version')} is "
                         f"not a FlexRank elastic checkpoint v{FORMAT_VERSION}")
    return meta


def _is_tied(model: nn.Module, key: str) -> bool:
    """safetensors stores a tied tensor once; the other name is reported missing."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and "lm_head" in key


# Files whose presence means a tokenizer was saved (save_tokenizer writes the first; slow
# tokenizers write one of the others).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt")


_SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _stored_float_dtype(path: Path):
    """The one floating dtype of every floating tensor in safetensors file `path` (from
    its header), or None when they differ, there are none, or the file cannot be read (the
    load that follows reports that)."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            kinds = {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - safetensors' own error type too; the load below says why
        return None
    floats = kinds & set(_SAFETENSORS_FLOATS)
    if len(floats) != 1:
        return None
    return getattr(torch, _SAFETENSORS_FLOATS[floats.pop()])


def _skeleton_from_config(directory: Path, model_class: str):
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} holds a bare nn.Module checkpoint: pass a skeleton "
                         "of the same architecture as model=")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    model_type = getattr(transformers, model_class, None)
    if model_type is None:
        raise ValueError(f"transformers has no class {model_class}; pass model=")
    model = model_type(config)  # random init, overwritten by the checkpoint
    tokenizer = None
    # only when tokenizer files were saved: otherwise transformers builds a default tokenizer
    # class for the model type and prints its notices about a tokenizer that does not exist
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    return model, tokenizer
