"""From a nested PyTorch model at one budget to an ONNX graph file (and ORT format, int8,
int4).

Model kinds:
- decoder LM (a transformers model that generates): optimum's exporter, task
  `text-generation-with-past`, so the graph has Hugging Face's KV-cache names and
  `optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(budget_dir)` runs it;
- other transformers models (BERT-style encoders, ViT): optimum, feature extraction;
- any other `nn.Module`: `torch.onnx.export` with dynamic batch/sequence axes over the
  `sample_inputs` the caller gives.

Each nested layer is first replaced by its deployment form (`deploy.py`), so the graph
holds MatMuls over dense, gauge-fixed or plain factors; after export tied weights are
stored once (`onnx_graph.store_tied_once`) and every budget is validated against PyTorch.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import onnx
import torch
from torch import nn

from flexrank.compress.config import _checked_dict
from flexrank.compress.depth_layers import depth_at
from flexrank.compress.models import max_positions
from flexrank.compress.select import nested_layers
from flexrank.exporters.common.forms import FormPolicy, deployable_model
from flexrank.exporters.common.sample import SAMPLE_TEXT
from flexrank.exporters.common.validate import DEFAULT_TOLERANCE
from flexrank.exporters.onnx.graph import save_model, store_tied_once
from flexrank.exporters.onnx.simplify import simplify
from flexrank.io import save_tokenizer

logger = logging.getLogger(__name__)

# Dynamic int8 quantizes each activation per tensor: an input whose max |x| is this many
# times its RMS (SmolLM2's down_proj inputs reach 190; ordinary inputs stay below 30) loses
# its ordinary entries to the outliers' scale, so such layers stay in float.
INT8_OUTLIER_RATIO = 32.0
# Fewest positions the rotary tables of a simplified decoder graph cover.
MIN_ROTARY_POSITIONS = 4096
# int4 (MatMulNBits): weights per scale along K, the MatMul's inner width; onnxruntime's
# CPU kernels take these powers of two (onnxruntime-genai's builder uses 32).
INT4_BLOCK_SIZES = (16, 32, 64, 128)
# int4 weight quantizers of `onnxruntime.quantization.matmul_nbits_quantizer`: "rtn" is its
# default block-wise round-to-nearest (scale, optional 4-bit zero point per block), "hqq"
# its Half-Quadratic Quantization (float zero points, no calibration data), "gptq" its GPTQ
# (calibration activations; symmetric only, and it re-rounds its result onto another grid,
# so on the tiny test Llama its output error is 1.4x RTN's); "auto": per MatMul the one with
# the least output error on the calibration activations (`int4.choose_algorithms_`)
INT4_ALGORITHMS = ("rtn", "hqq", "gptq", "auto")
# tied embedding/lm_head table: 4 or 8 bits in blocks, stored once (GatherBlockQuantized
# reads the lm_head's MatMulNBits weights), or 32: float, as exported
INT4_EMBEDDING_BITS = (4, 8, 32)
# MatMulNBits `accuracy_level`: 0 computes in the activations' float type; 4 quantizes
# each activation block to int8 for integer kernels (the builder's CPU default).
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class OnnxExportConfig:
    opset: int | None = None  # None: optimum's default for the architecture (18), else 18
    external_data: bool = False  # always write weights to `model.onnx_data` (auto above 2 GB)
    validate: bool = True
    tolerance: float = DEFAULT_TOLERANCE  # max |Δ| relative to max(1, max |reference|)
    generate: bool = True  # decoders: greedy 20 tokens must equal PyTorch's
    threads: int = 2  # onnxruntime threads for validation
    sample_text: str = SAMPLE_TEXT
    forms: FormPolicy = FormPolicy()  # dense / gauge-fixed / plain choice per layer
    int8_outlier_ratio: float = INT8_OUTLIER_RATIO  # int8: layers above stay float
    simplify: bool = True  # fuse and drop shape plumbing (`onnx_simplify`); False: as exported
    # elastic layout: one If branch per level, whose factor Slices onnxruntime folds at load
    # (SmolLM2: 1.6-3.8x faster per call, but 2.5x the memory: every level's factors held),
    # instead of Slicing every factor on each call (one copy of the factors in memory)
    elastic_branches: bool = False
    # with `simplify`: MatMuls that read the same input (q/k/v, gate/up, or their first
    # factors) as one MatMul + Split (`onnx_simplify.fuse_sibling_matmuls`); the shared and
    # elastic layouts and int8 exports never fuse (they address each layer's own weights)
    fuse_siblings: bool = True
    # quantize="int4": block-wise 4-bit weights (`int4.quantize_graph`); ranks are rounded to
    # multiples of the block size, the inner width of a factor pair's second MatMul
    int4_block_size: int = 32
    int4_algorithm: str = "rtn"
    # zero point 8 implied, as the builder does (4 + 32/32 = 5 bits per weight at block
    # 32); False stores a 4-bit zero point per block (5.125 bits). HQQ always stores float
    # zero points.
    int4_symmetric: bool = True
    int4_accuracy_level: int = 4
    int4_embedding_bits: int = 4  # the tied table: 4 or 8 (blocks), 32 (float)
    # "gptq", "auto" and the per-layer form choice run on calibration text: a text/JSONL
    # file or datasets folder (`flexrank.compress.calibration.load_texts`); None: the
    # export's sample text and text sampled from the model (data-free)
    int4_calibration: str | None = None
    int4_calibration_samples: int = 16  # sequences of int4_calibration_tokens tokens
    int4_calibration_tokens: int = 128
    # per layer, the cheapest of dense / plain / gauge-fixed whose relative output error
    # with int4 weights is within this factor of the best form's (`int4.choose_forms`);
    # None: plain factors or dense by cost, never gauge-fixed (`forms.quantized_policy`)
    int4_form_slack: float | None = None
    # decoders: the tokens onnxruntime-genai may hold, prompt + generated (genai_config's
    # search.max_length; with past_present_share_buffer its KV cache is allocated for this
    # many positions); None: the model's context (max_position_embeddings). flexrank-export
    # sets it to the device profile's context_tokens, which the decision's memory assumes.
    context_tokens: int | None = None
    version: int = 1

    def __post_init__(self):
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance {self.tolerance} must be in (0, 1)")
        if self.threads < 1:
            raise ValueError(f"threads {self.threads} must be >= 1")
        if self.int4_block_size not in INT4_BLOCK_SIZES:
            raise ValueError(f"int4_block_size {self.int4_block_size} is not supported by "
                             f"MatMulNBits; choose one of {list(INT4_BLOCK_SIZES)}")
        if self.int4_algorithm not in INT4_ALGORITHMS:
            raise ValueError(f"int4_algorithm {self.int4_algorithm!r} is not one of "
                             f"{list(INT4_ALGORITHMS)}")
        if self.int4_algorithm == "gptq" and not self.int4_symmetric:
            raise ValueError("int4_algorithm 'gptq' with int4_symmetric=False: onnxruntime "
                             "1.32's GPTQ packs 4-bit zero points across rows, wrong for a "
                             "weight with an odd number of blocks; use int4_symmetric=True")
        if self.int4_embedding_bits not in INT4_EMBEDDING_BITS:
            raise ValueError(f"int4_embedding_bits {self.int4_embedding_bits} must be one of "
                             f"{list(INT4_EMBEDDING_BITS)} (4 or 8: quantized blocks; 32: float)")
        if self.int4_calibration_samples < 1 or self.int4_calibration_tokens < 2:
            raise ValueError(f"int4_calibration_samples {self.int4_calibration_samples} and "
                             f"int4_calibration_tokens {self.int4_calibration_tokens} must be "
                             ">= 1 and >= 2")
        if self.int4_form_slack is not None and not self.int4_form_slack >= 1:
            raise ValueError(f"int4_form_slack {self.int4_form_slack} must be >= 1 (or None)")
        if self.context_tokens is not None and self.context_tokens < 2:
            raise ValueError(f"context_tokens {self.context_tokens} must be at least 2 (or "
                             "None: the model's context)")
        if self.int4_accuracy_level not in INT4_ACCURACY_LEVELS:
            raise ValueError(f"int4_accuracy_level {self.int4_accuracy_level} must be one of "
                             f"{list(INT4_ACCURACY_LEVELS)} (MatMulNBits accuracy_level)")

    def to_dict(self) -> dict:
        """JSON-ready, with a type and version tag (`forms` nested, see FormPolicy.to_dict)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"type": "OnnxExportConfig", **data, "forms": self.forms.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> OnnxExportConfig:
        """The config `to_dict` wrote; ValueError on another type tag, version or field."""
        data = _checked_dict(cls, data)
        if isinstance(data.get("forms"), dict):
            data["forms"] = FormPolicy.from_dict(data["forms"])
        return cls(**data)


ONNX_TASKS = {"decoder": "text-generation-with-past", "encoder": "feature-extraction"}


def onnx_task(model: nn.Module, kind: str) -> str | None:
    """optimum's export task for `model`: decoders `text-generation-with-past`; encoders the
    task of their head as optimum infers it from the class (BertForSequenceClassification:
    text-classification, ViTForImageClassification: image-classification, whose graphs
    output `logits`), `feature-extraction` (last_hidden_state) for a bare encoder or a head
    optimum cannot name; None for plain modules (torch.onnx)."""
    if kind != "encoder":
        return ONNX_TASKS.get(kind)
    from optimum.exporters.tasks import TasksManager

    try:
        task = TasksManager.infer_task_from_model(model)
    except (KeyError, ValueError):
        return ONNX_TASKS["encoder"]
    return task if task.endswith("classification") else ONNX_TASKS["encoder"]


def check_supported(model: nn.Module, kind: str) -> None:
    """Refuse, before any work, a transformers model that optimum's ONNX exporter has no
    config for (its model type is not registered for the task this kind needs).

    Raises ValueError naming the model type and the task; plain modules (kind "module")
    are exported by torch.onnx and always pass.
    """
    if kind not in ONNX_TASKS:
        return
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers optimum's configs)
    from optimum.exporters.tasks import TasksManager

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    task = onnx_task(model, kind)
    tasks = {}
    for name in {str(model_type), str(model_type).replace("_", "-")}:  # optimum keeps both
        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(
                name, exporter="onnx", library_name="transformers")
            break
        except KeyError:
            continue
    if task not in tasks:
        raise ValueError(f"model type {model_type!r} is not supported by the ONNX exporter "
                         f"(optimum-onnx has no {task!r} config for it); export a family it "
                         "supports (README: Architectures), or use --format executorch")


@contextmanager
def tracing_quietly():
    """Silence what tracing a Hugging Face model always says and the export makes right:
    TracerWarnings about Python booleans in transformers' mask and cache code (the sample
    shapes are generic, and validation checks other batch and sequence sizes), torch's
    note on aten::index, and optimum's message that the tied embedding and lm_head are two
    candidate initialisers (the exporter stores them once: store_tied_once). Shown when
    FlexRank logs at DEBUG (`flexrank -v`)."""
    if logging.getLogger("flexrank").isEnabledFor(logging.DEBUG):
        yield
        return
    optimum_log = logging.getLogger("optimum")  # optimum.utils.logging's library logger
    level = optimum_log.level
    optimum_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            yield
    finally:
        optimum_log.setLevel(level)


def export_graph(model: nn.Module, kind: str, folder: Path, sample_inputs,
                 config: OnnxExportConfig) -> Path:
    """Export `model` (already in deployment form) into `folder/model.onnx`."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("decoder", "encoder"):
        from optimum.exporters.onnx import onnx_export_from_model

        # optimum copies the tokenizer it finds at config._name_or_path (for SmolLM2, the
        # GGUF conversion's folder, whose slow tokenizer writes a 98 MB tokenizer.model); the
        # exporter writes the bundle's tokenizer itself (save_tokenizer), so hide that path
        source, model.config._name_or_path = model.config._name_or_path, ""
        try:
            with tracing_quietly():
                onnx_export_from_model(model, folder, task=onnx_task(model, kind),
                                       opset=config.opset, do_validation=False)
        finally:
            model.config._name_or_path = source
        return folder / "model.onnx"
    args = sample_inputs if isinstance(sample_inputs, tuple) else (sample_inputs,)
    input_names = [f"input_{i}" for i in range(len(args))]
    with torch.no_grad():
        out = model(*args)
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    output_names = [f"output_{i}" for i in range(len(outputs))]
    dynamic = {}
    for name, tensor in zip(input_names + output_names, (*args, *outputs), strict=True):
        # batch, and the sequence/spatial axes after the channel axis
        dynamic[name] = {0: "batch"} | {d: f"{name}_dim{d}" for d in range(2, tensor.dim())}
        if tensor.dim() == 2 and not tensor.is_floating_point():
            dynamic[name][1] = f"{name}_seq"
    path = folder / "model.onnx"
    torch.onnx.export(model, args, str(path), input_names=input_names,
                      output_names=output_names, dynamic_axes=dynamic,
                      opset_version=config.opset or 18, dynamo=False)
    return path


def tidy_graph(graph: onnx.ModelProto, kind: str, model: nn.Module, config: OnnxExportConfig,
               ) -> onnx.ModelProto:
    """Tied weights stored once; with `config.simplify`, the graph simplified
    (`onnx_simplify.simplify`: onnxruntime's fusions for transformers models, static shapes,
    GroupQueryAttention for decoders, sibling MatMuls with `config.fuse_siblings`) and the
    fused rotary tables recomputed by `model`."""
    removed = store_tied_once(graph)
    if removed:
        logger.info("%d duplicate (tied) initializers stored once", removed)
    if not config.simplify:
        return graph
    hf_config = getattr(model, "config", None)
    heads = getattr(hf_config, "num_attention_heads", 0) or 0
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if kind != "decoder":
        kv_heads = 0  # no attention fusion outside decoders
    graph = simplify(graph, num_heads=heads, hidden_size=getattr(hf_config, "hidden_size", 0) or 0,
                     kv_heads=kv_heads, fuse=kind in ("decoder", "encoder"),
                     siblings=config.fuse_siblings)
    rotary_tables(graph, model)
    return graph


def rotary_tables(graph: onnx.ModelProto, model: nn.Module) -> None:
    """Replace the `cos_cache` / `sin_cache` of onnxruntime's rotary fusion (131,072 rows
    from NumPy's cos, 34 MB for SmolLM2) by the model's own rotary module's values: equal to
    what PyTorch computes (gauge-fixed layers amplify float32 differences by up to their
    condition number), for the model's positions (`max_positions`), or
    `MIN_ROTARY_POSITIONS` if more (tiny test models declare 128)."""
    inits = {init.name: init for init in graph.graph.initializer}
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    rows = max_positions(model)  # the one rule for a model's trained positions
    if "cos_cache" not in inits or "sin_cache" not in inits or rotary is None or not rows:
        return
    half = inits["cos_cache"].dims[1]
    positions = torch.arange(min(max(rows, MIN_ROTARY_POSITIONS), inits["cos_cache"].dims[0]))
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    if cos.shape[-1] != 2 * half:
        return  # partial rotary or another layout: keep onnxruntime's tables
    for name, table in (("cos_cache", cos), ("sin_cache", sin)):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(table[0, :, :half].float().numpy(), name))


def replace_graph(graph: onnx.ModelProto, path: Path, external_data: bool) -> list[Path]:
    """Save `graph` over the file at `path` and its external data (external data when asked
    or above 2 GB)."""
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    return save_model(graph, path, external_data)


@torch.no_grad()
def outlier_layers(model: nn.Module, kind: str, sample, ratio: float = INT8_OUTLIER_RATIO,
                   ) -> dict[str, float]:
    """{nested layer: max|x| / rms(x) of its input on `sample`} for the layers above `ratio`."""
    found, handles = {}, []

    def hook(name):
        def record(_module, args):
            x = args[0].detach().double()
            found[name] = max(found.get(name, 0.0),
                              float(x.abs().max() / x.pow(2).mean().sqrt().clamp_min(1e-30)))
        return record

    for name, layer in nested_layers(model).items():
        handles.append(layer.register_forward_pre_hook(hook(name)))
    try:
        if kind == "decoder":
            model(input_ids=sample)
        elif kind == "encoder":
            model(**sample)
        else:
            model(*(sample if isinstance(sample, tuple) else (sample,)))
    finally:
        for handle in handles:
            handle.remove()
    return {name: value for name, value in found.items() if value > ratio}


def onnx_scope(name: str) -> str:
    """torch.onnx's node-name scope of module `name`: model.layers.0.mlp -> /model/layers.0/mlp/"""
    parts = []
    for part in name.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")


@contextmanager
def without_preprocessing_advice():
    """onnxruntime's quantizer advises (on the root logger, once per call) running its
    pre-processing (symbolic shape inference and graph optimisation) on a graph without
    that tag; `simplify` has done both, so the advice is dropped while it runs."""
    advice = _DropPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def quantize_int8(path: Path, float_layers=()) -> list[Path]:
    """onnxruntime dynamic quantization of the weight MatMuls (int8 weights per channel,
    activations per tensor at run time); the MatMuls of `float_layers` stay float.

    The graph must hold no gauge-fixed layer: int8 error in its z is amplified by
    ‖U[r:] U[:r]⁻¹‖ (`deploy.quantized_policy`), so export it with plain factors or dense."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scopes = tuple(onnx_scope(name) for name in float_layers)
    graph = onnx.load(str(path), load_external_data=False).graph
    keep = [n.name for n in graph.node if n.op_type == "MatMul" and n.name.startswith(scopes)]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        with without_preprocessing_advice():
            quantize_dynamic(path, out, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                             # onnx's shape inference cannot type the outputs of onnxruntime's
                             # fused ops (`onnx_simplify`); every activation here is float32
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        for stale in path.parent.glob(path.name + "*"):
            stale.unlink()
        written = []
        for produced in Path(tmp).iterdir():
            target = path.parent / produced.name
            shutil.move(produced, target)
            written.append(target)
    return written


def float_weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes of a quantized graph still multiplying by a float
    weight: the `float_layers` kept out of int8, and a tied lm_head, whose weight is a
    Transpose of the embedding table rather than an initializer (quantize_dynamic only
    quantizes constant initializers)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    weights |= {node.output[0] for node in graph.node
                if node.op_type == "Transpose" and node.input[0] in weights}
    return [node.name for node in graph.node
            if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights]


def convert_to_ort(folder: Path) -> list[Path]:
    """`.onnx` -> `.ort` in `folder` (ORT Mobile), plus `required_operators.config`."""
    command = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
               str(folder), "--output_dir", str(folder), "--optimization_style", "Fixed"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ORT-format conversion of {folder} failed:\n{result.stderr[-2000:]}")
    ort_files = sorted(folder.glob("*.ort"))
    if not ort_files:
        raise RuntimeError(f"ORT-format conversion of {folder} wrote no .ort file")
    for onnx_file in folder.glob("*.onnx*"):
        onnx_file.unlink()
    return ort_files + sorted(folder.glob("*.config"))


def torch_outputs(model: nn.Module, kind: str):
    """{graph output name: tensor} from a PyTorch forward, matching the export's names."""

    def run(inputs):
        if kind == "encoder":
            out = model(**inputs)
            return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        args = inputs_as_tuple(inputs)
        out = model(*args)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return {f"output_{i}": t for i, t in enumerate(outputs)}

    return run


def inputs_as_tuple(inputs) -> tuple:
    if isinstance(inputs, dict):
        return tuple(inputs[f"input_{i}"] for i in range(len(inputs)))
    return inputs if isinstance(inputs, tuple) else (inputs,)


def named_inputs(kind: str, sample) -> dict:
    if kind == "module":
        return {f"input_{i}": t for i, t in enumerate(inputs_as_tuple(sample))}
    return sample


def export_budget_graph(elastic, beta: float, kind: str, folder: Path, sample_inputs,
                        config: OnnxExportConfig, factors_only: bool = False,
                        ranks: dict[str, int] | None = None,
                        layer_forms: dict[str, str] | None = None):
    """Export one budget into `folder/model.onnx`, at the plan's ranks for `beta` or at
    `ranks` ({layer: rank}, e.g. rounded to the int4 block size); `layer_forms`: forms
    forced per layer (`deployable_model`).

    Returns (graph path, layer records, factors) where factors are the rank-major factor
    arrays {"<layer>.Vt": (r, n), "<layer>.Ut": (r, m)} when `factors_only`, else {}.
    """
    ranks = elastic.layer_ranks(beta) if ranks is None else ranks
    with depth_at(elastic.model, getattr(elastic, "plan", None), beta):  # blocks β replaces
        deployed, records = deployable_model(elastic.model, ranks, factors_only,
                                             config.forms, layer_forms)
    factors = {}
    if factors_only:
        for record in records:
            module = deployed.get_submodule(record.name)
            factors[f"{record.name}.Vt"] = module.Vt.detach().numpy().copy()
            factors[f"{record.name}.Ut"] = module.Ut.detach().numpy().copy()
    path = export_graph(deployed, kind, folder, sample_inputs, config)
    if elastic.tokenizer is not None and kind != "module":
        save_tokenizer(elastic.tokenizer, folder)
    return path, records, factors
