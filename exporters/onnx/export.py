"""The `onnx` and `ort` exporters: every budget of an `ElasticModel` in one of three layouts
(DESIGN.md §5), each validated against PyTorch.

Bundle layout (`out_dir`):

    per-budget   budget-<β>/model.onnx (+ config, tokenizer; decoders: genai_config.json,
                 which onnxruntime-genai's og.Model reads): self-contained, gauge-fixed
                 (int8, int4: plain factors or dense, see `forms.quantized_policy`;
                 int4: ranks rounded to the block size, `int4_ranks`)
    shared       shared/model-budget-<β>.onnx over shared/weights.bin (rank prefixes)
    elastic      elastic/model.onnx with an int64 input `rank_level` ([1]; 0 = smallest β)
    (all)        flexrank-manifest.json, written last by `flexrank.exporters.export`
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from flexrank.compress.models import model_kind
from flexrank.compress.select import nested_layers
from flexrank.exporters import register_exporter
from flexrank.exporters.common.entry import at_budget, budget_name, make_budget_entry
from flexrank.exporters.common.errors import GenerationMismatchError, OutputMismatchError
from flexrank.exporters.common.forms import FormPolicy, LayerExport, quantized_policy
from flexrank.exporters.common.gauge import LayerForm
from flexrank.exporters.common.precision import in_export_precision
from flexrank.exporters.common.ranks import block_aligned_ranks
from flexrank.exporters.common.sample import sample_for
from flexrank.exporters.common.validate import validate_decoder, validate_named
from flexrank.exporters.executorch.validate import at_ranks
from flexrank.exporters.onnx.attention import kv_cache_in_place
from flexrank.exporters.onnx.convert import (
    OnnxExportConfig,
    check_supported,
    convert_to_ort,
    export_budget_graph,
    float_weight_matmuls,
    named_inputs,
    outlier_layers,
    quantize_int8,
    replace_graph,
    tidy_graph,
    torch_outputs,
)
from flexrank.exporters.onnx.genai import og_readable_tokenizer_, write_genai_config
from flexrank.exporters.onnx.graph import canonical_factor_names, load_model, save_model
from flexrank.exporters.onnx.int4 import (
    calibration_ids,
    decoder_feeds,
    int4_report,
    quantize_graph,
)
from flexrank.exporters.onnx.layouts import (
    RANK_LEVEL,
    make_elastic,
    make_elastic_branches,
    write_shared,
)
from flexrank.manifest import Format, Manifest
from flexrank.planning.costs import plain_params
from flexrank.runtime.kv_cache import make_session

logger = logging.getLogger(__name__)


def validate_graph(elastic, beta, kind, graph: Path, sample, config: OnnxExportConfig,
                   strict: bool = True, feed_extra: dict | None = None,
                   ranks: dict[str, int] | None = None) -> dict:
    """`graph` against the PyTorch model at `beta` (or at `ranks`, the ranks it was
    exported with when they differ from the plan's)."""
    session = make_session(graph, config.threads)
    at = at_budget(elastic, beta) if ranks is None else at_ranks(elastic.model, ranks)
    with at as model:
        if kind == "decoder":
            report = validate_decoder(session, model, sample, config.tolerance, strict,
                                      config.generate, feed_extra)
        else:
            report = validate_named(session, torch_outputs(model, kind), named_inputs(kind, sample),
                                    config.tolerance, strict, feed_extra)
    logger.info("β=%g: max |Δ| %.3g, top-1 agreement %.4f, generation %s", beta,
                report.max_abs_diff, report.top1_agreement, report.generation_match)
    return report.to_dict()


# A budget whose gauge-fixed graph misses the validation tolerance is exported again with
# gauge blocks limited to this condition number, then without gauge fixing.
FALLBACK_CONDITION = 1e3


def fallback_policies(policy: FormPolicy) -> list[FormPolicy]:
    """The form policies to retry a budget with, in order, when its graph with `policy`
    fails validation by value: float32 rounding in a gauge-fixed layer reaches its output
    multiplied by up to the block's condition number (`deploy.quantized_policy`)."""
    if not policy.gauge_fixing or policy.force_form is not None:
        return []
    policies = []
    if policy.max_condition > FALLBACK_CONDITION:
        policies.append(replace(policy, max_condition=FALLBACK_CONDITION))
    return policies + [replace(policy, gauge_fixing=False)]


def cache_flag(kind: str, model: onnx.ModelProto) -> dict:
    """Decoders: {"kv_cache_in_place": bool}, whether a runtime may bind each cache input
    and output to one buffer that GroupQueryAttention updates (`CacheDecoder`)."""
    return {"kv_cache_in_place": kv_cache_in_place(model.graph)} if kind == "decoder" else {}


def int4_ranks(elastic, beta: float, block_size: int) -> dict[str, int]:
    """The plan's ranks at `beta` rounded to multiples of the int4 block size
    (`block_aligned_ranks`, the rule of the ExecuTorch 8da4w path)."""
    return block_aligned_ranks(elastic, beta, block_size, "int4")


def warn_merged_budgets(ranks_by_budget: dict[float, dict[str, int]], block_size: int) -> None:
    """Warn when rounding ranks to the int4 block makes two budgets the same model: their
    files would be identical while their labels differ (layers only a few blocks wide)."""
    seen: dict[tuple, float] = {}
    for beta in sorted(ranks_by_budget):
        key = tuple(sorted(ranks_by_budget[beta].items()))
        if key in seen:
            logger.warning("int4 rounds ranks to multiples of %d: budgets %g and %g become the "
                           "same model (the layers are only a few blocks wide); export fewer "
                           "budgets or pass a smaller OnnxExportConfig(int4_block_size=...)",
                           block_size, seen[key], beta)
        seen.setdefault(key, beta)


def needs_calibration(config: OnnxExportConfig, quantize) -> bool:
    """Whether an export runs calibration text through its graphs (int4: GPTQ, "auto")."""
    return quantize == "int4" and config.int4_algorithm in ("gptq", "auto")


def _export_budget(elastic, beta, kind, folder, sample, config, quantize, ort, ranks=None,
                   calibration=None):
    """One budget's graph in `folder` (at `ranks`, default the plan's): (layer records,
    graph path, manifest extras). `calibration`: token id batches (int4 GPTQ, "auto")."""
    shutil.rmtree(folder, ignore_errors=True)
    path, records, _ = export_budget_graph(elastic, beta, kind, folder, sample, config,
                                           ranks=ranks)
    model = tidy_graph(load_model(path), kind, elastic.model, config)
    extra = cache_flag(kind, model)  # int8 keeps the attention nodes: still true after it
    replace_graph(model, path, config.external_data)
    # quantization keeps the graph's inputs and outputs: what onnxruntime-genai reads
    io_graph = onnx.GraphProto(input=model.graph.input, output=model.graph.output)
    del model
    if quantize == "int8":
        with at_budget(elastic, beta) as model:
            float_layers = outlier_layers(model, kind, sample, config.int8_outlier_ratio)
        quantize_int8(path, float_layers)
        extra["int8_float_layers"] = {name: round(v, 1) for name, v in float_layers.items()}
        extra["int8_float_matmuls"] = float_weight_matmuls(path)
    elif quantize == "int4":
        if calibration and kind != "decoder":
            raise ValueError(f"int4_algorithm {config.int4_algorithm!r} calibrates decoders "
                             "only; use 'rtn' or 'hqq' for this model")
        feeds = decoder_feeds(path, calibration, config.threads) if calibration else None
        result = quantize_graph(path, config, feeds)
        replace_graph(result.model, path, config.external_data)
        extra["quantization"] = int4_report(result.model, [r.name for r in records], result,
                                            config, float_weight_matmuls(path))
        extra["plan_ranks"] = elastic.layer_ranks(beta)  # before rounding to the block size
    graph = convert_to_ort(folder)[0] if ort else path  # the .ort file, if any
    if kind == "decoder":
        write_genai_config(elastic.model, io_graph, graph, extra["kv_cache_in_place"])
        og_readable_tokenizer_(folder)  # og.Tokenizer reads it as Hugging Face does
    return records, graph, extra


def _per_budget(elastic, out_dir, budgets, kind, sample, config, quantize, ort):
    calibration = (calibration_ids(elastic, config, sample)
                   if needs_calibration(config, quantize) else None)
    # int8, int4: plain factors or dense, never gauge-fixed (`quantized_policy` says why);
    # the manifest's `forms` and `layers` record what each layer became
    first = config.forms if quantize is None else quantized_policy(config.forms)
    rounded = ({beta: int4_ranks(elastic, beta, config.int4_block_size) for beta in budgets}
               if quantize == "int4" else {})
    warn_merged_budgets(rounded, config.int4_block_size)
    entries = []
    for beta in budgets:
        folder = out_dir / budget_name(beta)
        policies, failed = [first, *fallback_policies(first)], []
        ranks = rounded.get(beta)
        for policy in policies:
            # int8 keeps the float layers by node scope, which a fused sibling MatMul hides;
            # int4 quantizes a fused MatMul as its parts (blocks run along K, per column)
            budget_config = replace(config, forms=policy,
                                    fuse_siblings=config.fuse_siblings and quantize != "int8")
            records, graph, extra = _export_budget(elastic, beta, kind, folder, sample,
                                                   budget_config, quantize, ort, ranks,
                                                   calibration)
            if not config.validate:
                validation = None
                break
            try:
                validation = validate_graph(elastic, beta, kind, graph, sample, config,
                                            strict=quantize is None, ranks=ranks)
                break
            except (OutputMismatchError, GenerationMismatchError) as error:
                gauge = sum(r.form == LayerForm.GAUGE.value for r in records)
                if policy is policies[-1] or not gauge:
                    raise
                failed.append({"max_condition": policy.max_condition,
                               "gauge_fixing": policy.gauge_fixing, "gauge_layers": gauge,
                               "error": str(error)})
                logger.warning("β=%g: the graph with %d gauge-fixed layers (condition ≤ %g) "
                               "failed validation (%s); exporting it again with fewer", beta,
                               gauge, policy.max_condition, error)
        if failed:
            extra["form_fallbacks"] = failed
        files = [f for f in folder.rglob("*") if f.is_file()]
        entries.append(make_budget_entry(elastic, beta, records, files, out_dir, validation,
                                    graph=graph.relative_to(out_dir).as_posix(), **extra))
    return entries


def _factor_graphs(elastic, budgets, kind, sample, config, scratch: Path):
    """Plain rank-major factor graphs per budget, largest first, canonical factor names."""
    graphs, records, factor_names, support_files = {}, {}, set(), []
    for beta in sorted(budgets, reverse=True):
        folder = scratch / budget_name(beta)
        path, records[beta], factors = export_budget_graph(elastic, beta, kind, folder, sample,
                                                           config, factors_only=True)
        # unfused: the layouts find and address every factor by its values
        model = tidy_graph(load_model(path), kind, elastic.model,
                           replace(config, fuse_siblings=False))
        factor_names |= canonical_factor_names(model, factors)
        graphs[beta] = model
        support_files = [f for f in folder.iterdir() if f.is_file() and ".onnx" not in f.name]
    return graphs, records, factor_names, support_files


def _shared(elastic, out_dir, budgets, kind, sample, config):
    folder = out_dir / "shared"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        graphs, records, factor_names, support = _factor_graphs(elastic, budgets, kind, sample,
                                                                config, Path(scratch))
        for f in support:
            shutil.copy(f, folder / f.name)
        names = {f"model-{budget_name(beta)}.onnx": model for beta, model in graphs.items()}
        flags = {beta: cache_flag(kind, model) for beta, model in graphs.items()}
        write_shared(names, factor_names, folder)
    entries = []
    for beta in budgets:
        graph = folder / f"model-{budget_name(beta)}.onnx"
        validation = (validate_graph(elastic, beta, kind, graph, sample, config)
                      if config.validate else None)
        files = [graph, folder / "weights.bin", *(folder / f.name for f in support)]
        entries.append(make_budget_entry(elastic, beta, records[beta], files, out_dir, validation,
                                    graph=graph.relative_to(out_dir).as_posix(), **flags[beta]))
    return entries


def _elastic(elastic, out_dir, budgets, kind, sample, config, ort):
    folder = out_dir / "elastic"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    top = max(budgets)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        graphs, records, factor_names, support = _factor_graphs(elastic, [top], kind, sample,
                                                                config, Path(scratch))
        for f in support:
            shutil.copy(f, folder / f.name)
    all_records = {beta: export_records(elastic, beta) for beta in budgets}
    factor_ranks = {}
    for name in factor_names:
        layer = name.rsplit(".", 1)[0]
        factor_ranks[name] = [all_records[beta][layer].rank for beta in budgets]
    graph = folder / "model.onnx"
    build = make_elastic_branches if config.elastic_branches else make_elastic
    model = build(graphs[top], factor_ranks)
    flag = cache_flag(kind, model)
    save_model(model, graph, config.external_data)
    if ort:
        graph = convert_to_ort(folder)[0]
    entries = []
    for level, beta in enumerate(budgets):
        feed = {RANK_LEVEL: np.array([level], np.int64)}
        validation = (validate_graph(elastic, beta, kind, graph, sample, config,
                                     feed_extra=feed) if config.validate else None)
        entries.append([beta, level, validation])
    files = [f for f in folder.iterdir() if f.is_file()]
    return [make_budget_entry(elastic, beta, list(all_records[beta].values()), files, out_dir,
                         validation, graph=graph.relative_to(out_dir).as_posix(),
                         rank_level=level, **flag)
            for beta, level, validation in entries]


def export_records(elastic, beta):
    """{layer: LayerExport} of the plain factors at `beta` (what the elastic graph computes)."""
    records = {}
    for name, rank in elastic.layer_ranks(beta).items():
        layer = nested_layers(elastic.model)[name]
        m, n = layer.U.shape[0], layer.V.shape[0]
        records[name] = LayerExport(name, (m, n), rank, "factors", None,
                                    plain_params(m, n, rank))
    return records


def _export(elastic, out_dir: Path, *, layout, budgets, quantize, ort: bool,
            sample_inputs=None, config: OnnxExportConfig | None = None) -> Manifest:
    config = config or OnnxExportConfig()
    if quantize is not None and layout != "per-budget":
        raise ValueError(f"--quantize {quantize} works with the per-budget layout only: the "
                         f"{layout} layout shares float factor prefixes across budgets")
    if ort and layout == "shared":
        raise ValueError("the ORT format embeds weights in each file: use --layout per-budget "
                         "or elastic with --format ort")
    elastic, _ = in_export_precision(elastic)
    kind = model_kind(elastic.model)
    check_supported(elastic.model, kind)
    sample = sample_for(kind, elastic.model, elastic.tokenizer, sample_inputs, config)
    if layout == "per-budget":
        entries = _per_budget(elastic, out_dir, budgets, kind, sample, config, quantize, ort)
    elif layout == "shared":
        entries = _shared(elastic, out_dir, budgets, kind, sample, config)
    else:
        entries = _elastic(elastic, out_dir, budgets, kind, sample, config, ort)
    # every file hashed once, here; `flexrank.exporters.export` adds the deployment
    return Manifest.build(out_dir, model_id=getattr(elastic, "model_id", "custom"), kind=kind,
                          export_format=Format.ORT if ort else Format.ONNX, layout=layout,
                          quantize=quantize, budgets=entries)


@register_exporter("onnx")
def export_onnx(elastic, out_dir, *, layout, budgets, quantize, **options) -> Manifest:
    return _export(elastic, Path(out_dir), layout=layout, budgets=budgets, quantize=quantize,
                   ort=False, **options)


@register_exporter("ort")
def export_ort(elastic, out_dir, *, layout, budgets, quantize, **options) -> Manifest:
    return _export(elastic, Path(out_dir), layout=layout, budgets=budgets, quantize=quantize,
                   ort=True, **options)
