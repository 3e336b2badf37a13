"""The `executorch` exporter: one `.pte` program per budget for phones (XNNPACK backend),
each validated in `executorch.runtime` against PyTorch (DESIGN.md §5).

    from flexrank.exporters import export
    export(elastic, "dist/", format="executorch",
           config=ExecutorchExportConfig(max_seq_len=256), quantize=None | "8da4w")

Bundle layout (`out_dir`):

    budget-<β>/model.pte        gauge-fixed factors (the per-layer forms of the ONNX path)
    budget-<β>/model.ptd        float decoders with a tied embedding/lm_head: the program's
                                constants, the table once (program.py, "Tied tables");
                                load with data_path (TextLLMRunner's third argument)
    budget-<β>/tokenizer files  decoders and encoders with a tokenizer
    flexrank-manifest.json      written last by `flexrank.exporters.export`

Decoder programs hold a static KV cache of `max_seq_len` positions: forward(input_ids
(1, T), cache_position (T,)) -> logits (1, T, V), T dynamic; the metadata methods are
listed in `executorch_program.decoder_metadata`, plus `get_flexrank_budget`,
`get_flexrank_ranks` (ints in the manifest's layer order) and `get_flexrank_ranks_json`.

`quantize="8da4w"`: int8 dynamic activations, int4 weights in groups of
`config.group_size` (torchao); ranks are first rounded to multiples of the group size
(`exporters.common.ranks.aligned_ranks`) so that every factorised layer is quantized; the
manifest lists the quantized layers and the ranks actually exported. With
`config.form_slack` (decoders) each layer below full rank ships as the cheapest of dense,
plain and gauge-fixed whose measured 8da4w output error is within that factor of the
best (`forms_8da4w.py`); the manifest's `quantization.forms` gives per layer
{"form", "errors", "params"}, as ONNX int4's `int4_form_slack` does.
"""

from __future__ import annotations

import copy
import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from flexrank.compress.config import _checked_dict
from flexrank.compress.depth_layers import depth_at
from flexrank.compress.models import model_kind
from flexrank.exporters import register_exporter
from flexrank.exporters.common.entry import budget_name, make_budget_entry
from flexrank.exporters.common.form_choice import calibration_ids
from flexrank.exporters.common.forms import FormPolicy, deployable_model, quantized_policy
from flexrank.exporters.common.precision import in_export_precision
from flexrank.exporters.common.ranks import block_aligned_ranks
from flexrank.exporters.common.sample import SAMPLE_TEXT, sample_for
from flexrank.exporters.common.validate import DEFAULT_TOLERANCE, GENERATION_TOKENS
from flexrank.exporters.executorch.forms_8da4w import choose_forms_8da4w
from flexrank.exporters.executorch.program import (
    LLMCustomOpsDecoder,
    decoder_metadata,
    decoder_wrapper,
    dynamic_axes,
    encoder_wrapper,
    flexrank_metadata,
    runner_readable_tokenizer_,
    segment_layout,
    trace_and_lower,
)
from flexrank.exporters.executorch.quant import (
    EMBEDDING_BITS,
    GROUP_SIZES,
    QUANTIZE_8DA4W,
    linear_forms_,
    quantize_8da4w_,
)
from flexrank.exporters.executorch.validate import (
    at_ranks,
    native_stderr_at_debug,
    validate_decoder_pte,
    validate_module_pte,
)
from flexrank.io import save_tokenizer
from flexrank.manifest import Format, Manifest

logger = logging.getLogger(__name__)

PROGRAM_FILE = "model.pte"
QUANTIZATIONS = (None, QUANTIZE_8DA4W)


@dataclass(frozen=True)
class ExecutorchExportConfig:
    max_seq_len: int = 128  # decoders: static KV-cache positions (prompt + generated)
    max_batch: int = 32  # encoders/modules: upper bound of the dynamic batch axis
    group_size: int = 32  # 8da4w: int4 weight group along the input axis
    embedding_bits: int | None = 8  # 8da4w: the input embedding, 8 per row, 4 grouped, None
    validate: bool = True
    tolerance: float = DEFAULT_TOLERANCE  # max |Δ| relative to max(1, max |reference|)
    generate: bool = True  # decoders: greedy 20 tokens must equal PyTorch's (float32)
    sample_text: str = SAMPLE_TEXT
    forms: FormPolicy = FormPolicy()  # per-layer dense / gauge-fixed / plain, as for ONNX
    # 8da4w decoders: per layer below full rank, the cheapest of dense / plain / gauge-fixed
    # whose measured 8da4w output error is within this factor of the best form's
    # (`forms_8da4w.choose_forms_8da4w`, on the model's own hidden states for token ids
    # sampled from it); None: plain factors or dense by cost (`forms.quantized_policy`)
    form_slack: float | None = None
    # decoders: the KV cache written by ExecuTorch's `llama::update_cache` and attention by
    # `llama::custom_sdpa` over the positions filled so far, as ExecuTorch's own LLM export
    # (`--use_sdpa_with_kv_cache`); False: transformers' static cache (index_put, a mask
    # and attention over all max_seq_len positions every step)
    custom_ops: bool = True
    version: int = 1

    def __post_init__(self):
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len {self.max_seq_len} must be at least 2")
        if self.max_batch < 1:
            raise ValueError(f"max_batch {self.max_batch} must be >= 1")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance {self.tolerance} must be in (0, 1)")
        if self.embedding_bits not in (*EMBEDDING_BITS, None):
            raise ValueError(f"embedding_bits {self.embedding_bits} is not supported; choose "
                             f"one of {list(EMBEDDING_BITS)} or None (float32)")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size} is not supported by 8da4w; choose "
                             f"one of {list(GROUP_SIZES)}")
        if self.form_slack is not None and not self.form_slack >= 1:
            raise ValueError(f"form_slack {self.form_slack} must be >= 1 (1: each layer's "
                             "form of least error) or None")

    def to_dict(self) -> dict:
        """JSON-ready, with a type and version tag (`forms` nested, see FormPolicy.to_dict)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"type": "ExecutorchExportConfig", **data, "forms": self.forms.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> ExecutorchExportConfig:
        """The config `to_dict` wrote; ValueError on another type tag, version or field."""
        data = _checked_dict(cls, data)
        if isinstance(data.get("forms"), dict):
            data["forms"] = FormPolicy.from_dict(data["forms"])
        return cls(**data)


def exported_ranks(elastic, beta: float, quantize: str | None, group_size: int) -> dict:
    if quantize != QUANTIZE_8DA4W:
        return elastic.layer_ranks(beta)
    return block_aligned_ranks(elastic, beta, group_size, "8da4w")


def tied_table(model) -> bool:
    """True when the output embedding's weight is the input embedding's tensor."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    table, head = get_in(), get_out()
    weight = getattr(head, "weight", None)
    return (isinstance(weight, torch.Tensor) and table is not None
            and weight.data_ptr() == table.weight.data_ptr())


def _positional(kind: str, sample) -> tuple:
    """The program's inputs in order (encoders: input_ids, attention_mask[, token_type_ids])."""
    if kind == "encoder":
        names = ["input_ids", "attention_mask"] + (["token_type_ids"]
                                                   if "token_type_ids" in sample else [])
        return tuple(sample[n] for n in names)
    return sample if isinstance(sample, tuple) else (sample,)


def _decoder_module(deployed, config: ExecutorchExportConfig, sample):
    """The decoder's exportable wrapper: ExecuTorch's LLM ops for its KV cache and
    attention (`LLMCustomOpsDecoder`) where, run eagerly on `sample` (1, T) prefilled in
    two chunks and one decode step, they give the model's own logits (its attention goes
    through transformers' attention functions); else, or with `config.custom_ops` off,
    transformers' static cache, with a warning saying why (e.g. a sliding window, which
    custom_sdpa lacks)."""
    if config.custom_ops:
        # checked on a copy: a failed attempt leaves nothing behind in the exported model
        try:  # the ops' eager kernels are ExecuTorch's: their native log goes to DEBUG
            with native_stderr_at_debug():
                reason = LLMCustomOpsDecoder(copy.deepcopy(deployed), config.max_seq_len) \
                    .mismatch(sample)
        except Exception as err:  # noqa: BLE001 - any failure means: the static cache
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if reason is None:
            return LLMCustomOpsDecoder(deployed, config.max_seq_len)
        logger.warning("the program's KV cache is transformers' static cache, not "
                       "ExecuTorch's LLM ops (~5x slower per token on SmolLM2): %s", reason)
    return decoder_wrapper(deployed, config.max_seq_len)


def _export_budget(elastic, beta, kind, sample, folder: Path, config, quantize,
                   calibration=None):
    """Write `folder/model.pte` for `beta`; returns (records, ranks, extra manifest fields,
    the deployed PyTorch module that was exported). `calibration`: token id batches for
    `config.form_slack` (8da4w decoders)."""
    ranks = exported_ranks(elastic, beta, quantize, config.group_size)
    # 8da4w: plain factors or dense, never gauge-fixed (`quantized_policy` says why; tiny
    # Llama, hidden 64, β = 0.4: max |Δlogits| to float32 0.87 gauge-fixed vs 0.11 plain,
    # top-1 0.81 vs 1.0). `forms.force_form` still overrides this (benchmarks); with
    # `form_slack` each layer's form is the one its measured 8da4w error chooses.
    policy = config.forms if quantize is None else quantized_policy(config.forms)
    forms = None
    if calibration is not None and quantize == QUANTIZE_8DA4W and config.form_slack is not None:
        forms = choose_forms_8da4w(elastic.model, ranks, calibration, config.form_slack,
                                   config.group_size)
    deployed, records = deployable_model(
        elastic.model, ranks, policy=policy,
        layer_forms={name: choice["form"] for name, choice in (forms or {}).items()})
    quantization = None
    if quantize == QUANTIZE_8DA4W:
        linear_forms_(deployed)
        quantization = quantize_8da4w_(deployed, list(ranks), config.group_size,
                                       config.embedding_bits).to_dict()
        if forms is not None:
            quantization["forms"] = forms
    metadata = flexrank_metadata(beta, ranks, quantize)
    if kind == "decoder":
        module, traced_inputs = _decoder_module(deployed, config, sample[:1]), sample[:1]
        custom = isinstance(module, LLMCustomOpsDecoder)
        metadata.update(decoder_metadata(elastic.model, config.max_seq_len, custom))
    elif kind == "encoder":
        module = encoder_wrapper(deployed, sample)
        traced_inputs = _positional(kind, sample)
    else:
        module, traced_inputs = deployed, _positional(kind, sample)
    path = folder / PROGRAM_FILE
    # a float decoder whose lm_head reads the embedding's table: every constant in
    # model.ptd, the table once (program.py, "Tied tables"); 8da4w quantizes the two
    # differently (8-bit rows for the lookup, int4 groups for the head), nothing to share
    weights_file = kind == "decoder" and quantize is None and tied_table(deployed)
    attention = module.custom_attention() if isinstance(module, LLMCustomOpsDecoder) \
        else nullcontext()
    with attention:
        program = trace_and_lower(module, kind, traced_inputs, config.max_seq_len,
                                  config.max_batch, path, metadata,
                                  quantized=quantize is not None, weights_file=weights_file)
    if elastic.tokenizer is not None and kind != "module":
        save_tokenizer(elastic.tokenizer, folder)
        runner_readable_tokenizer_(folder)  # TextLLMRunner reads it as Hugging Face does
    extra = {"program": segment_layout(path), "dynamic_axes": dynamic_axes(program),
             "quantization": quantization}
    if kind == "decoder":
        extra["max_seq_len"] = config.max_seq_len
    if quantize is not None:
        extra["plan_ranks"] = elastic.layer_ranks(beta)  # before alignment to the group size
    return records, ranks, extra, deployed


def _compare(model, kind, sample, path: Path, config, strict: bool, generate: bool,
             dynamic: dict) -> dict:
    """Run `path` in the ExecuTorch runtime against the PyTorch `model` on `sample`."""
    if kind == "decoder":
        report = validate_decoder_pte(path, model, sample, config.tolerance, strict, generate)
    else:
        run = encoder_wrapper(model, sample) if kind == "encoder" else model
        inputs = _positional(kind, sample)
        names = getattr(run, "output_names", None)
        report = validate_module_pte(path, run, inputs, config.tolerance, strict, names)
        if all(0 in axes for axes in dynamic.values()) and inputs[0].shape[0] > 1:
            # a second batch size through the dynamic batch axis
            validate_module_pte(path, run, tuple(t[:1] for t in inputs), config.tolerance,
                                strict)
    return report.to_dict()


def _validate(elastic, kind, sample, path: Path, ranks, config, twin, quantize,
              dynamic: dict) -> dict:
    """Against the nested PyTorch model at the exported ranks (strict in float32); a
    quantized program also against its quantized eager twin, which checks the lowering
    apart from the quantization error."""
    with at_ranks(elastic.model, ranks) as model:
        report = _compare(model, kind, sample, path, config, quantize is None, config.generate,
                          dynamic)
    if quantize is not None:
        report["quantized_reference"] = _compare(twin, kind, sample, path, config, False,
                                                 False, dynamic)
    logger.info("%s: max |Δ| %.3g, top-1 agreement %.4f, generation %s", path,
                report["max_abs_diff"], report["top1_agreement"], report["generation_match"])
    return report


def _check_arguments(layout, quantize, kind, sample, config):
    if layout != "per-budget":
        raise ValueError(f"the executorch format has the per-budget layout only (got "
                         f"{layout!r}): a .pte embeds its weights")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantize!r} is not available for executorch; choose "
                         f"None or {QUANTIZE_8DA4W!r} (int8 is the ONNX path's)")
    if kind == "decoder" and config.generate and config.validate:
        needed = sample.shape[1] + GENERATION_TOKENS
        if needed > config.max_seq_len:
            raise ValueError(f"max_seq_len {config.max_seq_len} is too short to validate: the "
                             f"sample prompt ({sample.shape[1]} tokens) plus {GENERATION_TOKENS} "
                             f"generated tokens need {needed}")
    if quantize == QUANTIZE_8DA4W and config.form_slack is not None and kind != "decoder":
        raise ValueError(f"form_slack {config.form_slack} measures each layer's forms on a "
                         f"decoder's hidden states for token ids; this model is a {kind}: "
                         "export it with form_slack=None (plain factors or dense by cost)")


@register_exporter("executorch")
def export_executorch(elastic, out_dir, *, layout, budgets, quantize, sample_inputs=None,
                      config: ExecutorchExportConfig | None = None) -> Manifest:
    config = config or ExecutorchExportConfig()
    out_dir = Path(out_dir)
    elastic, _ = in_export_precision(elastic)
    kind = model_kind(elastic.model)
    sample = sample_for(kind, elastic.model, elastic.tokenizer, sample_inputs, config)
    _check_arguments(layout, quantize, kind, sample, config)
    calibration = (calibration_ids(elastic, sample)
                   if quantize == QUANTIZE_8DA4W and config.form_slack is not None else None)
    entries = []
    for beta in budgets:
        folder = out_dir / budget_name(beta)
        shutil.rmtree(folder, ignore_errors=True)
        # the ranks alone do not say which blocks β replaces (issue 18): the plan does
        with depth_at(elastic.model, getattr(elastic, "plan", None), beta):
            with torch.no_grad():
                records, ranks, extra, twin = _export_budget(elastic, beta, kind, sample,
                                                             folder, config, quantize,
                                                             calibration)
            path = folder / PROGRAM_FILE
            validation = (_validate(elastic, kind, sample, path, ranks, config, twin,
                                    quantize, extra["dynamic_axes"])
                          if config.validate else None)
        files = [f for f in folder.rglob("*") if f.is_file()]
        entries.append(make_budget_entry(elastic, beta, records, files, out_dir, validation,
                                    graph=path.relative_to(out_dir).as_posix(), **extra))
    return Manifest.build(out_dir, model_id=getattr(elastic, "model_id", "custom"), kind=kind,
                          export_format=Format.EXECUTORCH, layout=layout, quantize=quantize,
                          budgets=entries,
                          executorch={"backend": "XnnpackBackend", "versions": _versions()})


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("executorch", "torchao"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
