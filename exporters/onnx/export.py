"""The `onnx` and `ort` exporters: every budget of an `ElasticModel` in one of three layouts
(DESIGN.md §5), each validated against PyTorch.

Bundle layout (`out_dir`):

    per-budget   budget-<β>/model.onnx (+ config, tokenizer; decoders: genai_config.json,
                 which onnxruntime-genai's og.Model reads): self-contained, gauge-fixed
                 (int8, int4: plain factors or dense, see `forms.quantized_policy`;
                 int4: ranks rounded to the block size, `int4_ranks`; with
                 `int4_form_slack`, each layer's form by output error, `int4_forms`)
    shared       shared/model-budget-<β>.onnx over shared/weights.bin (rank prefixes;
                 int4: of the 4-bit blocks too, `int4_layouts`)
    elastic      elastic/model.onnx with an int64 input `rank_level` ([1]; 0 = smallest β;
                 int4: one If branch per level); decoders: genai_config.json (og sets
                 `rank_level` with generator.set_model_input)
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

from flexrank.compress.depth_layers import depth_at
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
from flexrank.exporters.onnx.int4_forms import choose_forms
from flexrank.exporters.onnx.int4_layouts import check_layout_config, quantize_factor_graph
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
    # at_ranks sets ranks only: which blocks β replaces (issue 18) comes from the plan
    with depth_at(elastic.model, getattr(elastic, "plan", None), beta), at as model:
        if kind == "decoder":
            report = validate_decoder(session, model, sample, config.tolerance, strict,
                                      config.generate, feed_extra)
        else:
            report = validate_named(session, torch_outputs(model, kind), named_inputs(kind, sample),
                                    config.tolerance, strict, feed_extra)
    logger.debug("β=%g: max |Δ| %.3g, top-1 agreement %.4f, generation %s", beta,
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
    """Whether an export runs calibration text through its models (int4: GPTQ, "auto",
    the per-layer form choice)."""
    return quantize == "int4" and (config.int4_algorithm in ("gptq", "auto")
                                   or config.int4_form_slack is not None)


def needs_graph_calibration(config: OnnxExportConfig) -> bool:
    return config.int4_algorithm in ("gptq", "auto")


def _export_budget(elastic, beta, kind, folder, sample, config, quantize, ort, ranks=None,
                   calibration=None):
    """One budget's graph in `folder` (at `ranks`, default the plan's): (layer records,
    graph path, manifest extras). `calibration`: token id batches (int4 GPTQ, "auto", the
    per-layer form choice)."""
    shutil.rmtree(folder, ignore_errors=True)
    forms = None
    if quantize == "int4" and config.int4_form_slack is not None and kind == "decoder":
        with depth_at(elastic.model, getattr(elastic, "plan", None), beta):  # β's blocks
            forms = choose_forms(elastic.model, ranks or elastic.layer_ranks(beta),
                                 calibration, config)
    path, records, _ = export_budget_graph(
        elastic, beta, kind, folder, sample, config, ranks=ranks,
        layer_forms={name: choice["form"] for name, choice in (forms or {}).items()})
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
        if needs_graph_calibration(config) and kind != "decoder":
            raise ValueError(f"int4_algorithm {config.int4_algorithm!r} calibrates decoders "
                             "only; use 'rtn' or 'hqq' for this model")
        feeds = (decoder_feeds(path, calibration, config.threads)
                 if calibration and needs_graph_calibration(config) else None)
        result = quantize_graph(path, config, feeds)
        replace_graph(result.model, path, config.external_data)
        extra["quantization"] = int4_report(result.model, [r.name for r in records], result,
                                            config, float_weight_matmuls(path))
        if forms:
            extra["quantization"]["forms"] = forms
        extra["plan_ranks"] = elastic.layer_ranks(beta)  # before rounding to the block size
    graph = convert_to_ort(folder)[0] if ort else path  # the .ort file, if any
    if kind == "decoder":
        write_genai_config(elastic.model, io_graph, graph, extra["kv_cache_in_place"],
                           config.context_tokens)
        og_readable_tokenizer_(folder)  # og.Tokenizer reads it as Hugging Face does
    return records, graph, extra


def _per_budget(elastic, out_dir, budgets, kind, sample, config, quantize, ort):
    calibration = (calibration_ids(elastic, config, sample)
                   if needs_calibration(config, quantize) and kind == "decoder" else None)
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


def _factor_graphs(elastic, budgets, kind, sample, config, scratch: Path, quantize=None):
    """Plain rank-major factor graphs per budget, largest first, canonical factor names;
    with `quantize` "int4", at ranks rounded to the block size and quantized with each
    factor's 4-bit tensors stored rank on axis 0 (`int4_layouts`).

    Returns (graphs, records, names of the rank-prefix tensors, support files, int4 extras
    per budget: {"ranks", "tensors", "nodes", "quantization"})."""
    graphs, records, factor_names, support_files, int4 = {}, {}, set(), [], {}
    for beta in sorted(budgets, reverse=True):
        folder = scratch / budget_name(beta)
        ranks = (int4_ranks(elastic, beta, config.int4_block_size) if quantize == "int4"
                 else None)
        path, records[beta], factors = export_budget_graph(elastic, beta, kind, folder, sample,
                                                           config, factors_only=True,
                                                           ranks=ranks)
        # unfused: the layouts find and address every factor by its values
        model = tidy_graph(load_model(path), kind, elastic.model,
                           replace(config, fuse_siblings=False))
        names = canonical_factor_names(model, factors)
        if quantize == "int4":
            model, tensors, nodes = quantize_factor_graph(model, names, config)
            names = set(tensors)
            int4[beta] = {"ranks": ranks, "tensors": tensors, "nodes": nodes}
        factor_names |= names
        graphs[beta] = model
        support_files = [f for f in folder.iterdir() if f.is_file() and ".onnx" not in f.name]
    return graphs, records, factor_names, support_files, int4


def _layout_int4_record(config, int4: dict, model) -> dict:
    """The manifest's `quantization` and `plan_ranks`-like extras of a shared/elastic int4
    budget."""
    heads = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    bits = next((a.i for n in heads for a in n.attribute if a.name == "bits"), 32)
    return {"scheme": "int4", "block_size": config.int4_block_size,
            "algorithm": config.int4_algorithm,
            "symmetric": config.int4_symmetric and config.int4_algorithm != "hqq",
            "accuracy_level": config.int4_accuracy_level, "embedding_bits": bits,
            "rank_tensors": {name: t.axis for name, t in sorted(int4["tensors"].items())}}


def _shared(elastic, out_dir, budgets, kind, sample, config, quantize=None):
    folder = out_dir / "shared"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        graphs, records, factor_names, support, int4 = _factor_graphs(
            elastic, budgets, kind, sample, config, Path(scratch), quantize)
        for f in support:
            shutil.copy(f, folder / f.name)
        names = {f"model-{budget_name(beta)}.onnx": model for beta, model in graphs.items()}
        flags = {beta: cache_flag(kind, model) for beta, model in graphs.items()}
        extras = {beta: {"quantization": _layout_int4_record(config, int4[beta], graphs[beta]),
                         "plan_ranks": elastic.layer_ranks(beta)} if beta in int4 else {}
                  for beta in budgets}
        write_shared(names, factor_names, folder)
    support = [folder / f.name for f in support]
    if kind == "decoder":  # the largest budget's; another is one overlay away (genai.py)
        top = max(budgets)
        genai = write_genai_config(elastic.model, graphs[top].graph,
                                   folder / f"model-{budget_name(top)}.onnx",
                                   all(flags[beta]["kv_cache_in_place"] for beta in budgets),
                                   config.context_tokens)
        og_readable_tokenizer_(folder)
        support += [genai] if genai is not None else []
    entries = []
    for beta in budgets:
        graph = folder / f"model-{budget_name(beta)}.onnx"
        ranks = int4[beta]["ranks"] if beta in int4 else None
        validation = (validate_graph(elastic, beta, kind, graph, sample, config,
                                     strict=quantize is None, ranks=ranks)
                      if config.validate else None)
        files = [graph, folder / "weights.bin", *support]
        entries.append(make_budget_entry(elastic, beta, records[beta], files, out_dir, validation,
                                    graph=graph.relative_to(out_dir).as_posix(), **flags[beta],
                                    **extras[beta]))
    return entries


def _elastic(elastic, out_dir, budgets, kind, sample, config, ort, quantize=None):
    folder = out_dir / "elastic"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    top = max(budgets)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        graphs, records, factor_names, support, int4 = _factor_graphs(
            elastic, [top], kind, sample, config, Path(scratch), quantize)
        for f in support:
            shutil.copy(f, folder / f.name)
    ranks = {beta: (int4_ranks(elastic, beta, config.int4_block_size) if int4
                    else elastic.layer_ranks(beta)) for beta in budgets}
    all_records = {beta: export_records(elastic, beta, ranks[beta]) for beta in budgets}
    factor_ranks, node_attributes = {}, {}
    if int4:
        # axis 0 of each rank tensor: ranks ("N") or rank blocks ("K"); and the MatMulNBits
        # attribute that is the rank, per level (`make_elastic_branches`)
        block = config.int4_block_size
        for name, tensor in int4[top]["tensors"].items():
            unit = 1 if tensor.axis == "N" else block
            factor_ranks[name] = [ranks[beta][tensor.layer] // unit for beta in budgets]
        for node, axis in int4[top]["nodes"].items():
            layer = _node_layer(graphs[top], node, int4[top]["tensors"])
            node_attributes[node] = {axis: [ranks[beta][layer] for beta in budgets]}
    else:
        for name in factor_names:
            layer = name.rsplit(".", 1)[0]
            factor_ranks[name] = [all_records[beta][layer].rank for beta in budgets]
    graph = folder / "model.onnx"
    if int4:  # MatMulNBits' K and N are attributes: one branch per level, not a run-time Slice
        model = make_elastic_branches(graphs[top], factor_ranks, node_attributes)
    else:
        build = make_elastic_branches if config.elastic_branches else make_elastic
        model = build(graphs[top], factor_ranks)
    flag = cache_flag(kind, model)
    extra = ({"quantization": _layout_int4_record(config, int4[top], graphs[top])}
             if int4 else {})
    save_model(model, graph, config.external_data)
    if ort:
        graph = convert_to_ort(folder)[0]
    if kind == "decoder":  # og runs a budget with generator.set_model_input(RANK_LEVEL, …)
        write_genai_config(elastic.model, model.graph, graph, flag["kv_cache_in_place"],
                           config.context_tokens)
        og_readable_tokenizer_(folder)
    entries = []
    for level, beta in enumerate(budgets):
        feed = {RANK_LEVEL: np.array([level], np.int64)}
        validation = (validate_graph(elastic, beta, kind, graph, sample, config,
                                     strict=quantize is None, feed_extra=feed,
                                     ranks=ranks[beta] if int4 else None)
                      if config.validate else None)
        entries.append([beta, level, validation])
    files = [f for f in folder.iterdir() if f.is_file()]
    return [make_budget_entry(elastic, beta, list(all_records[beta].values()), files, out_dir,
                         validation, graph=graph.relative_to(out_dir).as_posix(),
                         rank_level=level, **flag, **extra,
                         **({"plan_ranks": elastic.layer_ranks(beta)} if int4 else {}))
            for beta, level, validation in entries]


def _node_layer(model, node_name: str, tensors) -> str:
    """The layer whose rank tensors the MatMulNBits `node_name` reads."""
    node = next(n for n in model.graph.node if n.name == node_name)
    for name in node.input[1:]:
        stored = name.removesuffix(".nk")
        if stored in tensors:
            return tensors[stored].layer
    raise ValueError(f"{node_name} reads no rank tensor")


def export_records(elastic, beta, ranks=None):
    """{layer: LayerExport} of the plain factors at `beta` (what the elastic graph computes),
    at `ranks` when given (int4: rounded to the block size)."""
    records = {}
    for name, rank in (elastic.layer_ranks(beta) if ranks is None else ranks).items():
        layer = nested_layers(elastic.model)[name]
        m, n = layer.U.shape[0], layer.V.shape[0]
        records[name] = LayerExport(name, (m, n), rank, "factors", None,
                                    plain_params(m, n, rank))
    return records


def _export(elastic, out_dir: Path, *, layout, budgets, quantize, ort: bool,
            sample_inputs=None, config: OnnxExportConfig | None = None) -> Manifest:
    config = config or OnnxExportConfig()
    if quantize == "int8" and layout != "per-budget":
        raise ValueError(f"--quantize {quantize} works with the per-budget layout only: the "
                         f"{layout} layout shares float factor prefixes across budgets")
    if quantize == "int4" and layout != "per-budget":
        check_layout_config(config, layout)
    if ort and layout == "shared":
        raise ValueError("the ORT format embeds weights in each file: use --layout per-budget "
                         "or elastic with --format ort")
    plan = getattr(elastic, "plan", None)
    if layout == "elastic" and hasattr(plan, "replaced_for"):  # a joint plan (issue 18)
        replacing = [b for b in (budgets or plan.budgets) if plan.replaced_for(b)]
        if replacing:
            raise ValueError(f"the elastic layout is one graph whose rank_level input picks "
                             f"the budget: it cannot switch blocks to their stand-ins, which "
                             f"the joint plan does at β = {', '.join(map(str, replacing))}; "
                             "use --layout per-budget or shared")
    elastic, _ = in_export_precision(elastic)
    kind = model_kind(elastic.model)
    check_supported(elastic.model, kind)
    sample = sample_for(kind, elastic.model, elastic.tokenizer, sample_inputs, config)
    if layout == "per-budget":
        entries = _per_budget(elastic, out_dir, budgets, kind, sample, config, quantize, ort)
    elif layout == "shared":
        entries = _shared(elastic, out_dir, budgets, kind, sample, config, quantize)
    else:
        entries = _elastic(elastic, out_dir, budgets, kind, sample, config, ort, quantize)
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
