"""`flexrank-export` (= `flexrank export`) and `flexrank profiles`.

Stages of an export, each announced with its time: [1] the elastic checkpoint (loaded,
or built by `compress` with fast defaults and cached), [2] the budget decision for the
profile, [3] the export with validation against PyTorch, [4] host measurement of the
exported budget in its runtime (onnxruntime, or ExecuTorch for a decoder `.pte`; a fresh
process, so the peak memory is the bundle's), [5] the manifest with the decision, the measured host
figures and the predicted device figures.

The bundle is finished or absent: the output folder is locked for the whole run, stages
3-5 write into a folder beside it, the manifest is written once, last (each file hashed
once, in stage 3), and the folder is renamed into place only then.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import re
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from flexrank.cli.compress import budget_list, positive_number, whole_number
from flexrank.compress.aliases import ALIASES, DEFAULT_MODEL
from flexrank.device.decide import DEFAULT_QUALITY_TOLERANCE
from flexrank.device.host import host_threads
from flexrank.device.predict import PRECISION_BITS
from flexrank.exporters import (
    Deployment,
    Format,
    Layout,
    Quantization,
    bundle_lock,
    checked_options,
    staged_bundle,
)
from flexrank.io import cache_dir, check_writable
from flexrank.manifest import write_manifest

logger = logging.getLogger(__name__)

MEASURE_NEW_TOKENS = 16  # decoded tokens timed on the host (median and p90 over them)


class Stages:
    """Prints `[i/n] name ...` and the seconds each stage took (the CLI's progress)."""

    def __init__(self, total: int):
        self.total, self.index, self.times = total, 0, {}

    def start(self, name: str) -> None:
        self.index += 1
        self.name, self.started = name, time.perf_counter()
        print(f"[{self.index}/{self.total}] {name} ...", flush=True)

    def done(self, note: str = "") -> None:
        seconds = time.perf_counter() - self.started
        self.times[self.name] = seconds
        print(f"[{self.index}/{self.total}] {self.name}: {seconds:.1f} s{note}", flush=True)


DEFAULT_BUDGETS = "1,0.8,0.6,0.4"  # the plan of a plain model compressed with fast defaults


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=DEFAULT_MODEL,
                   help="elastic checkpoint (a `flexrank compress` output folder) or a model "
                        f"(alias, HF folder, .gguf) to compress first (default: {DEFAULT_MODEL})")
    p.add_argument("--profile", help="device profile: a shipped name (`flexrank profiles`) or "
                                     "a YAML file; needed for --budget auto")
    p.add_argument("--budget", default="auto",
                   help="auto (with --precision auto: the (β, precision) of best measured "
                        "quality that meets every target, then the smallest within "
                        "--quality-tolerance), all, or a β of the plan (default: auto)")
    p.add_argument("--precision", choices=("auto", *PRECISION_BITS), default="auto",
                   help="auto (chosen with the budget among the precisions the profile's "
                        "runtimes ship: onnxruntime fp32, int8, int4; executorch fp32, "
                        "8da4w; the artifact follows the chosen one) or one of them "
                        "(default: auto; fp32 without a profile)")
    p.add_argument("--quality-tolerance", type=_fraction, default=DEFAULT_QUALITY_TOLERANCE,
                   help="candidates within this fraction of the best quality (perplexity; "
                        "an encoder's cosine, a classifier's top-1 agreement) count as "
                        "equally good; the smallest of them ships (default: 0.01 = 1 %%)")
    p.add_argument("--max-size", type=positive_number, metavar="MB",
                   help="largest download (weights as deployed), MB; replaces the profile's")
    p.add_argument("--max-memory", type=positive_number, metavar="GB",
                   help="memory for the model (weights, KV cache, activations), GB; replaces "
                        "the profile's")
    p.add_argument("--min-decode", type=positive_number, metavar="TOK/S",
                   help="slowest acceptable decode, tokens/s; replaces the profile's")
    p.add_argument("--max-ttft", type=positive_number, metavar="S",
                   help="longest acceptable time to first token, s; replaces the profile's")
    p.add_argument("--format", choices=[str(f) for f in Format], default=None,
                   help="onnx, ort (onnxruntime's mobile format) or executorch (.pte for "
                        "XNNPACK) (default: the format of the runtime that ships the chosen "
                        "precision, among the profile's runtimes; onnx without a profile)")
    p.add_argument("--layout", choices=[str(layout) for layout in Layout],
                   default=str(Layout.PER_BUDGET),
                   help="per-budget (one graph per budget), shared (graphs over one weight "
                        "file) or elastic (one graph, budget as an input) (default: "
                        "per-budget)")
    # every format's choices; `_checked_job` names the ones that do not fit --format
    p.add_argument("--quantize", choices=("none", *map(str, Quantization)), default="none",
                   help="onnx/ort: int8 (dynamic) or int4 (MatMulNBits, blocks of 32); "
                        "executorch: 8da4w (int8 dynamic activations, int4 weights in "
                        "groups of 32); ranks rounded to the block (default: none)")
    # int4's knobs (exporters/onnx/int4.py), the values of OnnxExportConfig's int4_* fields
    p.add_argument("--int4-algo", choices=("rtn", "hqq", "gptq", "auto"), default="rtn",
                   help="int4 weight quantizer (onnxruntime's): rtn (round to nearest), hqq, "
                        "gptq (on calibration text), auto (per MatMul the one with the least "
                        "output error); shared/elastic layouts: rtn (default: rtn)")
    p.add_argument("--block-size", type=int, choices=(16, 32, 64, 128), default=32,
                   help="int4: weights per scale along each MatMul's inner width; ranks are "
                        "rounded to it (default: 32)")
    p.add_argument("--embedding-bits", type=int, choices=(4, 8, 32), default=4,
                   help="int4: bits of the tied embedding/lm_head table, stored once "
                        "(32: float) (default: 4)")
    p.add_argument("--form-slack", type=_slack, default=None, metavar="X",
                   help="int4 (onnx/ort) and 8da4w (executorch) decoders: per layer below "
                        "full rank, ship the cheapest of dense / plain factors / gauge-fixed "
                        "whose output error, measured with the quantized weights on "
                        "calibration text, is within X (>= 1) times the best form's; the "
                        "manifest records each layer's errors; with --precision auto it "
                        "applies when the decision picks int4 or 8da4w; refused for fp32 "
                        "and int8 (default: plain factors or dense by cost, never "
                        "gauge-fixed)")
    p.add_argument("-o", "--output", default="dist", help="bundle folder (must be empty)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the budget decision and write nothing")
    p.add_argument("--work-dir", help="where a plain model's compress run is cached "
                                      "(default: compress/<model> in $FLEXRANK_CACHE, "
                                      "else ~/.cache/flexrank)")
    p.add_argument("--budgets", type=budget_list, default=DEFAULT_BUDGETS,
                   help="budgets of the plan when compressing a plain model")
    p.add_argument("--steps", type=whole_number(0), default=None,
                   help="distillation steps when compressing a plain model (default: fast "
                        "defaults, see flexrank.compress.pipeline.fast_compress_config)")
    p.add_argument("--calib", default=None,
                   help="calibration data when compressing a plain model: a text or .jsonl "
                        "file or a datasets folder for a text model (default: text sampled "
                        "from the model, 'teacher', which encoders and classifiers cannot "
                        "do); a folder of images or .npy files, or a .npy file (N, ...), for "
                        "a vision model")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--quality-tolerance {text!r}: give a fraction like "
                                         "0.01") from None
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"--quality-tolerance {text}: must be in [0, 1) (a "
                                         "fraction of the best quality: 0.01 = 1 %)")
    return value


def _slack(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"--form-slack {text}: give a factor >= 1 (1: each "
                                         "layer's form of least error; 1.25: within 25 %)")
    return value


def _parse_budget(text: str) -> str | float:
    if text in ("auto", "all"):
        return text
    try:
        beta = float(text)
    except ValueError:
        raise ValueError(f"--budget {text!r}: give auto, all or a number like 0.6") from None
    if not 0 < beta <= 1:
        raise ValueError(f"--budget {beta} is out of range (0, 1]")
    return beta


def _exporter_available(fmt: str) -> None:
    from flexrank.exporters import EXPORTERS

    if fmt in EXPORTERS:
        return
    try:  # formats outside the core register themselves when their module is imported
        importlib.import_module(f"flexrank.exporters.{fmt}")
    except ImportError as err:
        raise ValueError(f"--format {fmt} is not available in this installation ({err}); "
                         f"available: {', '.join(sorted(EXPORTERS))}") from None
    if fmt not in EXPORTERS:
        raise ValueError(f"--format {fmt} is not available in this installation; available: "
                         f"{', '.join(sorted(EXPORTERS))}")


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} is not empty: choose a new -o folder or remove "
                         "it (a bundle is never written over another)")


def _default_work_dir(source: str, config) -> Path:
    """The compress cache of `source` with `config` (a CompressConfig), keyed on the model
    it names, not on how it was typed (`model_identity`): `m` in two working folders is two
    models, two entries; and on the settings' resume signature, so that other budgets or a
    release with other fast defaults get a folder of their own instead of one that refuses
    them (more --steps resume the same folder: steps are not in the signature)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(source)).strip("_") or "model"
    signature = config.signature("")
    probe = signature["probe"]  # the fisher settings, where inert, as before they existed
    fisher = probe["mode"] in ("fisher", "auto")
    for key in ("fisher_draws", "fisher_points"):
        if not fisher or (key == "fisher_points" and probe[key] == 0):
            probe.pop(key)
    settings = json.dumps(signature, sort_keys=True)
    tag = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return cache_dir("compress", f"{slug[-40:]}-{model_identity(source)[:16]}-fast-{tag}")


def model_identity(source: str) -> str:
    """A hash of what `source` resolves to: an alias with the version of the package that
    ships its weights, or a path made absolute with the name, size and mtime of each file
    (a .gguf, or a model folder's files). A changed file changes it; no weight is read."""
    from importlib import metadata

    from flexrank.compress.aliases import ALIASES

    text = str(source)
    if text in ALIASES:
        package, filename = ALIASES[text]
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = None  # compress says which package to install
        parts = ["alias", text, package, str(version), filename]
    else:
        path = Path(text).expanduser().resolve()
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        parts = ["path", str(path)]
        for file in files:
            if file.exists():
                stat = file.stat()
                parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _fast_config(args):
    """The CompressConfig a plain model is compressed with: the fast defaults, with
    --budgets and --steps."""
    from dataclasses import replace

    from flexrank.compress.pipeline import fast_compress_config

    config = fast_compress_config(args.budgets)
    if args.steps is not None:
        config = replace(config, distill=replace(config.distill, steps=args.steps))
    if getattr(args, "calib", None):
        config = replace(config, calib=str(args.calib))
    return config


def load_or_compress(args):
    """An ElasticModel from an elastic folder, or `compress` with fast defaults (cached)."""
    from flexrank.compress.elastic import META_FILE, ElasticModel, resolve_elastic_dir

    source = Path(str(args.source)).expanduser()
    if source.is_dir() and (resolve_elastic_dir(source) / META_FILE).is_file():
        print(f"    elastic checkpoint {source}")
        given = {"--budgets": args.budgets != budget_list(DEFAULT_BUDGETS),
                 "--steps": args.steps is not None,
                 "--calib": getattr(args, "calib", None) is not None}
        ignored = [name for name, set_by_user in given.items() if set_by_user]
        if ignored:
            print(f"    note: {' and '.join(ignored)} apply when compressing a plain model; "
                  "this checkpoint keeps its own plan and training")
        return ElasticModel.from_pretrained(source)
    if str(args.source) not in ALIASES and not source.exists():
        raise ValueError(f"{args.source} does not exist: give an elastic checkpoint folder, a "
                         f"Hugging Face model folder, a .gguf file or an alias "
                         f"({', '.join(ALIASES)})")
    from flexrank.compress.pipeline import compress

    config = _fast_config(args)
    work = Path(args.work_dir) if args.work_dir else _default_work_dir(args.source, config)
    print(f"    compressing {args.source} with fast defaults into {work} (cached: a second "
          "run starts at the export)", flush=True)
    with _few_token_warnings_at_debug():
        elastic, summary = compress(args.source, work, config)
    print(summary)
    return elastic


# What the calibration and DataSVD say about too few calibration tokens: advice to whoever
# chose the token count, which under flexrank-export's fast defaults is not the user
FEW_TOKEN_LOGGERS = ("flexrank.compress.calibration", "flexrank.compress.covariance",
                     "flexrank.compress.surgery")


class _AtDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


@contextmanager
def _few_token_warnings_at_debug():
    """While the fast defaults compress, the few-calibration-tokens warnings are DEBUG
    lines (shown with -v): the fast defaults chose the count, and `flexrank compress
    --samples` is the way to more. One line says so instead."""
    print("    (the fast defaults calibrate on few tokens, so small budgets are rough; "
          "`flexrank compress --samples N` makes a better checkpoint; -v shows the details)")
    loggers = [logging.getLogger(name) for name in FEW_TOKEN_LOGGERS]
    note = _AtDebug()
    for logger in loggers:
        logger.addFilter(note)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(note)


def _budgets_to_export(elastic, request, decision, layout: str) -> list[float]:
    if request == "all":
        return list(elastic.budgets)
    if request == "auto":
        # shared/elastic bundles exist to switch budgets: ship them all, default to the choice
        return [decision.beta] if layout == Layout.PER_BUDGET else list(elastic.budgets)
    return [elastic._match_budget(request)]  # BudgetError lists the plan's budgets


@dataclass(frozen=True)
class ExportJob:
    """The command's options, checked before anything is loaded or written."""

    request: str | float  # "auto", "all" or a β
    # flexrank.device.profiles.DeviceProfile: with one runtime, the format's; with several
    # (`also_runs`, no --format), the decision picks one and `shipping` narrows it
    profile: object | None
    format: Format  # with several runtimes: the default runtime's, until `shipping`
    layout: Layout
    quantize: Quantization | None  # fixed by --quantize/--precision; else the decision's
    out: Path
    dry_run: bool
    precisions: tuple[str, ...] = ("fp32",)  # the candidates' precisions
    constraints: object | None = None  # flexrank.device.decide.Constraints
    int4: dict | None = None  # OnnxExportConfig int4_* fields from --int4-algo etc.
    form_slack: float | None = None  # --form-slack: int4's int4_form_slack, 8da4w's form_slack
    formats: dict | None = None  # {precision: Format} when the decision also picks the runtime

    def shipping(self, precision: str) -> ExportJob:
        """This job narrowed to the runtime that ships `precision` (its format, its profile
        with that runtime alone); unchanged when the format was fixed."""
        if not self.formats:
            return self
        from dataclasses import replace

        fmt = self.formats[precision]
        return replace(self, format=fmt, formats=None,
                       profile=self.profile.running(FORMAT_RUNTIME[fmt]))


@dataclass(frozen=True)
class Choice:
    """Stage 2's outcome: the plan's costs, the profile's decision (None without a
    profile), the budget request matched to the plan, the budgets to export and the
    bundle's default budget."""

    costs: list
    decision: object | None  # flexrank.device.decide.Decision
    request: str | float
    budgets: list[float]
    chosen: float
    quantize: Quantization | None = None  # the precision exported


def cmd_export(args) -> int:
    job = _checked_job(args)
    with ExitStack() as writing:
        if not job.dry_run:  # a second writer is refused before any work
            writing.enter_context(bundle_lock(job.out))
            _check_output(job.out)
        stages = Stages(3 if job.dry_run else 5)
        elastic = _checkpoint_stage(stages, args)
        costs, decision, request = _decision_stage(stages, elastic, job,
                                                   checkpoint_folder(args))
        if request == "auto" and decision.beta is None:
            print(f"error: {decision.explanation}", file=sys.stderr)
            return 1
        if job.dry_run:
            print("dry run: nothing written")
            return 0
        choice = _choose(elastic, job, costs, decision, request)
        job = job.shipping("fp32" if choice.quantize is None else str(choice.quantize))
        # a bundle is finished or absent: built beside `out`, renamed into place at the end
        with staged_bundle(job.out) as folder:
            manifest = _export_stage(stages, elastic, folder, job, choice)
            host = _measure_stage(stages, folder, manifest, job, choice)
            _manifest_stage(stages, folder, manifest.with_deployment(
                deployment_of(choice, job.profile, host)))
    profile = job.profile
    precision = "fp32" if choice.quantize is None else str(choice.quantize)
    print(f"bundle: {job.out} (β {choice.chosen:g} {precision}, {job.format}"
          + (f", for {profile.name})" if profile else ")"))
    return 0


def _quantize_fits(fmt: str, quantize: str) -> None:
    """ValueError naming --quantize and --format when the format does not offer it."""
    from flexrank.exporters import QUANTIZATIONS

    offered = [str(q) for q in QUANTIZATIONS.get(fmt, ())]
    if quantize != "none" and quantize not in offered:
        raise ValueError(f"--quantize {quantize} does not fit --format {fmt}: {fmt} offers "
                         f"--quantize {', '.join(['none', *offered])}"
                         + ("; int8 and int4 are onnx/ort's" if fmt == Format.EXECUTORCH
                            else "; 8da4w is executorch's" if quantize == "8da4w" else ""))


def _checked_job(args) -> ExportJob:
    from flexrank.device.profiles import load_profile

    request = _parse_budget(args.budget)
    if request == "auto" and not args.profile:
        raise ValueError("--budget auto needs --profile NAME|FILE (see `flexrank profiles`)")
    profile = load_profile(args.profile) if args.profile else None
    fixed = _fixed_quantize(args)
    if profile is not None and args.format is None and fixed not in (None, "none") \
            and fixed not in profile.precisions():
        raise ValueError(f"--precision {fixed}: {profile.describe_runtimes()}; choose one of "
                         f"those, or add --format to ship {fixed} for another runtime")
    fmt_name = args.format or _format_of(profile, fixed, args.layout)
    _exporter_available(fmt_name)
    if fixed is not None:
        _quantize_fits(fmt_name, fixed)
    form_slack = getattr(args, "form_slack", None)
    if form_slack is not None and fixed in ("none", "int8"):
        raise ValueError(f"--form-slack {form_slack} chooses forms by their int4 / 8da4w "
                         f"error; with {'fp32' if fixed == 'none' else fixed} weights it means "
                         "nothing: add --quantize int4 (onnx/ort) or 8da4w (executorch), or "
                         "drop --form-slack")
    fmt, layout, quantize = checked_options(fmt_name, args.layout, fixed)
    formats = _runtime_formats(profile, fmt, layout) \
        if profile is not None and args.format is None and fixed is None else None
    if formats:  # the decision picks the precision, and with it the runtime and format
        precisions = tuple(formats)
    else:
        precisions = _candidate_precisions(fmt, layout, fixed, profile)
        if profile is not None:
            runtime = FORMAT_RUNTIME.get(fmt)
            reason = f"--format {fmt} ships {runtime}" if args.format \
                else f"{fixed} ships in {runtime}" if fixed not in (None, "none") else None
            profile = _shipped_runtime(profile, fmt, reason)
    out = Path(args.output)
    if not args.dry_run:  # the bundle and its lock are built beside `out`, in its parent
        check_writable(out.expanduser().absolute().parent,
                       f"the folder that holds -o {out} (the bundle is built beside it)")
    from flexrank.device.decide import Constraints

    constraints = Constraints(args.max_size, args.max_memory, args.min_decode, args.max_ttft,
                              args.quality_tolerance)
    int4 = {"int4_algorithm": getattr(args, "int4_algo", "rtn"),
            "int4_block_size": getattr(args, "block_size", 32),
            "int4_embedding_bits": getattr(args, "embedding_bits", 4),
            "int4_form_slack": form_slack}
    return ExportJob(request, profile, fmt, layout, quantize, out, args.dry_run, precisions,
                     constraints, int4, form_slack, formats)


# Which runtime runs each format, and the format a runtime's profile gets by default.
FORMAT_RUNTIME = {Format.ONNX: "onnxruntime", Format.ORT: "onnxruntime",
                  Format.EXECUTORCH: "executorch"}
RUNTIME_FORMAT = {"onnxruntime": Format.ONNX, "executorch": Format.EXECUTORCH}


def _format_of(profile, fixed: str | None = None, layout: str = str(Layout.PER_BUDGET)) -> str:
    """The artifact follows the runtime: an ExecuTorch profile gets a .pte; a precision
    fixed by --quantize/--precision gets the format of the profile's runtime that ships it
    (int4 on a phone that also runs onnxruntime-genai: onnx). Otherwise the first of the
    profile's runtimes that is installed and has `layout` (pixel8 with --layout elastic:
    onnx); the default runtime's when none is, whose error then names what is missing."""
    from flexrank.exporters import FORMAT_LAYOUTS

    if profile is None:
        return str(Format.ONNX)
    if fixed not in (None, "none"):  # _checked_job refused one no runtime here ships
        return str(RUNTIME_FORMAT[profile.runtime_for(fixed)])
    default_installed = _runtime_installed(RUNTIME_FORMAT[profile.runtime])
    for runtime, _ in profile.runtimes():
        fmt = RUNTIME_FORMAT[runtime]
        allowed = FORMAT_LAYOUTS.get(fmt, (tuple(Layout), ""))[0]
        if _runtime_installed(fmt) and layout in [str(a) for a in allowed]:
            if runtime != profile.runtime:
                why = f"has no {layout} layout" if default_installed else "is not installed"
                print(f"note: {profile.name}'s default runtime is {profile.runtime}, which "
                      f"{why}, so {runtime} ships ({fmt})")
            return str(fmt)
    return str(RUNTIME_FORMAT.get(profile.runtime, Format.ONNX))


def _runtime_installed(fmt) -> bool:
    """Whether the runtime package a format needs can be imported (the exporters register
    without it; ExecuTorch's is imported only when a program is lowered or run)."""
    import importlib.util

    package = {Format.EXECUTORCH: "executorch"}.get(fmt, "onnxruntime")
    return importlib.util.find_spec(package) is not None


def _runtime_formats(profile, fmt, layout) -> dict | None:
    """{precision: Format} over every runtime of the profile whose package is installed
    (fp32 on `fmt`, the runtime `_format_of` chose), or None when the profile has one
    runtime or the layout is not per-budget (the decision then weighs `fmt`'s own
    precisions: `_candidate_precisions`)."""
    from flexrank.exporters import QUANTIZATIONS

    if not profile.also_runs or layout != Layout.PER_BUDGET:
        return None
    formats = {"fp32": fmt}
    for runtime, _ in profile.runtimes():
        other = RUNTIME_FORMAT[runtime]
        if not _runtime_installed(other):
            logger.info("%s is not installed: %s's candidates in it left out", runtime,
                        profile.name)
            continue
        for quantization in QUANTIZATIONS.get(other, ()):
            formats.setdefault(str(quantization), other)
    return formats if len(set(formats.values())) > 1 else None


def _fixed_quantize(args) -> str | None:
    """The quantization --quantize or --precision fixes ("none" for fp32), or None when
    the decision chooses it (--precision auto with a profile)."""
    quantize, precision = args.quantize, getattr(args, "precision", "auto")
    if quantize != "none":
        if precision not in ("auto", quantize):
            raise ValueError(f"--quantize {quantize} and --precision {precision} disagree; "
                             "give one of them")
        return quantize
    if precision == "fp32":
        return "none"
    if precision != "auto":
        return precision
    return None if args.profile else "none"


def _candidate_precisions(fmt, layout, fixed: str | None, profile) -> tuple[str, ...]:
    from flexrank.exporters import QUANTIZATIONS

    if fixed is not None:
        return ("fp32",) if fixed == "none" else (fixed,)
    if layout != Layout.PER_BUDGET:  # quantized exports are per budget (checked_options)
        return ("fp32",)
    return ("fp32", *map(str, QUANTIZATIONS.get(fmt, ())))


def _shipped_runtime(profile, fmt, reason: str | None = None):
    """The profile as it runs the format, alone: its runtime replaced by the format's when
    --format (or the runtime of a fixed --precision, or of the layout) names another, so
    that the prediction uses the shipped runtime's efficiency; `reason` says why in a
    note (None: `_format_of` said it already)."""
    runtime = FORMAT_RUNTIME.get(fmt)
    if runtime is None:
        return profile
    shipped = profile.running(runtime)
    if runtime != profile.runtime and reason:
        print(f"note: {profile.name}'s default runtime is {profile.runtime}; {reason}, so the "
              f"prediction uses {runtime}/{shipped.backend}'s efficiency")
    return shipped


def checkpoint_folder(args) -> Path | None:
    """The elastic checkpoint folder `load_or_compress` reads or writes."""
    from flexrank.compress.elastic import META_FILE, resolve_elastic_dir

    source = Path(str(args.source)).expanduser()
    if source.is_dir() and (resolve_elastic_dir(source) / META_FILE).is_file():
        return resolve_elastic_dir(source)
    work = Path(args.work_dir) if args.work_dir else _default_work_dir(args.source,
                                                                      _fast_config(args))
    return work / "elastic"


def _checkpoint_stage(stages: Stages, args):
    stages.start("elastic checkpoint")
    elastic = load_or_compress(args)
    stages.done(f" (budgets {elastic.budgets})")
    return elastic


def _decision_stage(stages: Stages, elastic, job: ExportJob, folder: Path | None = None):
    """({precision: the plan's costs}, the profile's decision or None, the budget request
    matched to the plan). With a profile, each (β, precision) candidate carries its
    held-out quality, read from the checkpoint or measured once and stored there."""
    from flexrank.compress.budget_cost import budget_costs

    profile = job.profile
    stages.start("budget decision" + (f" for {profile.name}" if profile else ""))
    embedding_bits = job.int4.get("int4_embedding_bits") if job.int4 else None
    costs = {p: budget_costs(elastic, None if p == "fp32" else p,
                             embedding_bits=embedding_bits if p == "int4" else None)
             for p in job.precisions}
    decision = _decide(elastic, job, costs, folder) if profile else None
    request = job.request
    if isinstance(request, float):
        request = elastic._match_budget(request)
    stages.done()
    if decision is not None:
        print(decision.table(None if job.request == "auto" else job.request))
    return costs, decision, request


def _decide(elastic, job: ExportJob, costs: dict, folder: Path | None):
    from flexrank.compress.quality import quality_rows
    from flexrank.device.decide import Candidate, Quality, decide

    def original():
        from flexrank.compress.models import load_model

        return load_model(elastic.model_id)[0].eval()

    rows, note = quality_rows(elastic, folder, job.precisions, original)
    kinds = {"feature": "held-out cosine of the pooled embedding and feature loss, to the "
                        "original",
             "class_kl": "held-out top-1 agreement and class KL, to the original"}
    label = kinds.get(rows[0].get("objective") if rows else None,
                      "held-out perplexity, KL to the original")
    print(f"    quality ({label}): {note}")
    measured = {(float(r["beta"]), r["precision"]): r for r in rows}
    candidates = []
    for precision, plan_costs in costs.items():
        for cost in plan_costs:
            row = measured.get((float(cost.beta), precision))
            quality = None if row is None else Quality.from_row(row, note)
            candidates.append(Candidate(cost, precision, quality))
    return decide(candidates, job.profile, job.constraints)


def _choose(elastic, job: ExportJob, costs: dict, decision, request) -> Choice:
    """The budgets to export, the default one and the precision; a note when the requested
    budget does not meet the profile's targets."""
    budgets = _budgets_to_export(elastic, request, decision, job.layout)
    fits = decision is not None and decision.beta is not None
    chosen = decision.beta if fits and decision.beta in budgets else max(budgets)
    precision = _precision(job, decision, chosen, request)
    if decision is not None and request != "auto":
        row = next(r for r in decision.rows if r.beta == chosen and r.precision == precision)
        if not row.fits:
            print(f"note: β {chosen:g} {precision} does not meet {job.profile.name}'s targets "
                  "(predicted): " + "; ".join(c.describe() for c in row.failures))
    quantize = None if precision == "fp32" else Quantization(precision)
    return Choice(costs[precision], decision, request, budgets, chosen, quantize)


def _precision(job: ExportJob, decision, beta: float, request) -> str:
    """The fixed precision; else the decision's; else, for a β asked for by hand, the
    best-quality fitting precision at that β (fp32 when none fits)."""
    if job.quantize is not None or len(job.precisions) == 1:
        return "fp32" if job.quantize is None else str(job.quantize)
    if decision is None:
        return "fp32"
    if decision.precision is not None and (request == "auto" or decision.beta == beta):
        return decision.precision
    at = [r for r in decision.rows if r.beta == beta and r.fits]
    if not at:
        return "fp32"
    return min(at, key=lambda r: (r.quality.rank() if r.quality else (math.inf,),
                                  r.size_mb)).precision


def _export_stage(stages: Stages, elastic, folder: Path, job: ExportJob, choice: Choice):
    """The exporter's files in `folder`, validated; their manifest (not yet written)."""
    from flexrank.exporters import ExportRequest, export_files

    stages.start(f"export {job.format}/{job.layout} of β {choice.budgets} with validation")
    request = ExportRequest(job.format, job.layout, tuple(choice.budgets), choice.quantize)
    manifest = export_files(elastic, folder, request,
                            config=_exporter_config(elastic, job, choice))
    stages.done()
    for entry in manifest.budgets:
        v = entry.validation or {}
        print(f"    β {entry.beta:g}: {entry.bytes / 2**20:.1f} MiB, validation max "
              f"|Δ| {v.get('max_abs_diff', float('nan')):.3g}, top-1 agreement "
              f"{v.get('top1_agreement', float('nan')):.4f}")
    return manifest


def _exporter_config(elastic, job: ExportJob, choice: Choice):
    """The format's exporter config: --int4-* / --form-slack, and for a decoder exported
    for a profile, the profile's context (capped at the model's positions) as the tokens
    the runtime holds: ExecuTorch's static KV cache (`max_seq_len`), onnxruntime-genai's
    max_length. That is the context the decision's memory figure counts the KV cache for."""
    from flexrank.compress.models import max_positions, model_kind

    context = None
    if job.profile is not None and model_kind(elastic.model) == "decoder":
        limit = max_positions(elastic.model)
        context = job.profile.context_tokens if limit is None \
            else min(job.profile.context_tokens, limit)
    if job.format == Format.EXECUTORCH:
        from flexrank.exporters.executorch.export import ExecutorchExportConfig

        fields = {"form_slack": job.form_slack} if str(choice.quantize) == "8da4w" else {}
        return ExecutorchExportConfig(**fields, **({"max_seq_len": context} if context else {}))
    from flexrank.exporters.onnx.convert import OnnxExportConfig

    fields = dict(job.int4 or {}) if str(choice.quantize) == "int4" else {}
    return OnnxExportConfig(**fields, context_tokens=context)


def _measure_stage(stages: Stages, folder: Path, manifest, job: ExportJob,
                   choice: Choice) -> dict | None:
    runtime = "ExecuTorch" if job.format == Format.EXECUTORCH else "onnxruntime"
    stages.start(f"host measurement of β {choice.chosen:g} in {runtime}")
    host = measure_bundle(folder, manifest, choice.chosen, job.profile, job.format)
    stages.done()
    if host:
        print("    " + describe_host(host))
    return host


def _manifest_stage(stages: Stages, folder: Path, manifest) -> None:
    """The manifest, written once, last: the bundle is finished."""
    stages.start("manifest")
    write_manifest(folder, manifest)
    stages.done()


def measure_bundle(folder: Path, manifest, beta: float, profile, fmt: str) -> dict | None:
    """Host figures of budget `beta` of the exported files in `folder`, run from the
    in-memory `manifest` (the bundle's is not written yet), in the runtime of the format
    (`.pte` programs in ExecuTorch's, decoders only); None where not measured."""
    if fmt == Format.EXECUTORCH and manifest.kind != "decoder":
        print(f"    (a {manifest.kind} .pte is validated by the exporter; host timing of "
              "ExecuTorch programs is for decoders)")
        return None
    from flexrank.cli.host_measure import HostMeasureError, measure_in_child
    from flexrank.device.host import host_key

    # a fresh process: this one's freed compress/export memory would hide the session's
    prompt = profile.targets.prompt_tokens if profile else 64
    try:
        figures = measure_in_child(folder, manifest, beta, host_threads(profile), prompt,
                                   MEASURE_NEW_TOKENS)
    except HostMeasureError as err:  # the validated export still ships, without figures
        logger.warning("host measurement skipped: %s", err)
        return None
    figures["host"] = host_key()
    return figures


def describe_host(h: dict) -> str:
    if "latency_ms" in h:  # an encoder or classifier: latency per inference (batch 1)
        timed = f"median of {h['inferences']}, p90 {h['latency_ms_p90']:.2f} ms; " \
            if "inferences" in h else ""
        return (f"measured on host ({h['threads']} threads): {h['latency_ms']:.2f} ms per "
                f"inference ({timed}one input: "
                f"{h.get('input', str(h['prompt_tokens']) + ' token ids')}), peak RSS "
                f"{h['peak_rss_mb']:.0f} MiB")
    return (f"measured on host ({h['threads']} threads): TTFT {h['ttft_s']:.3f} s for "
            f"{h['prompt_tokens']} tokens, decode {h['decode_ms_median']:.1f} ms/token median, "
            f"{h['decode_ms_p90']:.1f} p90 ({h['decode_tokens_per_s']:.1f} tok/s), load "
            f"{h['load_s']:.2f} s, peak RSS {h['peak_rss_mb']:.0f} MiB")


def deployment_of(choice: Choice, profile, host: dict | None) -> Deployment:
    """The manifest's deployment: the decision, the host figures and the predicted ones."""
    decision = choice.decision
    predicted = None
    if decision is not None:
        precision = "fp32" if choice.quantize is None else str(choice.quantize)
        predicted = {
            "label": f"predicted for {profile.name} by flexrank.device.predict (not measured)",
            "profile": profile.name, "precision": precision,
            # the runtime the bundle is for, whose efficiency predicted it
            "runtime": profile.runtime, "backend": profile.backend,
            "budgets": [{"beta": b["beta"], "ttft_s": b["ttft_s"],
                         "decode_tokens_per_s": b["decode_tokens_per_s"],
                         "memory_gb": b["memory_gb"], "fits": b["fits"],
                         "quality": b["quality"]}
                        for b in decision.to_dict()["budgets"]
                        if b["precision"] == precision]}
    if host is not None:
        runtime = host.get("runtime", "onnxruntime")
        host = {**host, "label": f"measured on host {host['host']} in {runtime} "
                                 f"({host['threads']} threads)"}
    return Deployment(
        chosen_beta=choice.chosen, budget_request=str(choice.request),
        profile=profile.name if profile else None,
        threads=profile.threads if profile else None,
        budget_costs=[cost_dict(c) for c in choice.costs],
        profiles={profile.name: decision.to_dict()} if decision is not None else {},
        predicted_device_latency=predicted, host_latency=host)


def cost_dict(cost) -> dict:
    from dataclasses import asdict

    return asdict(cost)


def add_parser(sub) -> None:
    p = sub.add_parser("export", prog="flexrank-export",
                       help="pick a budget for a device profile, export it, validate it and "
                            "measure it (= flexrank-export)")
    add_export_args(p)
    p.set_defaults(func=cmd_export)
