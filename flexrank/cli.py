"""Command line: `flexrank <command>` and `flexrank-export`."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from flexrank.distill import DistillConfig
from flexrank.models import ALIASES, DEFAULT_MODEL
from flexrank.pipeline import CompressConfig

logger = logging.getLogger("flexrank")

def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="teacher",
                   help="calibration source: 'teacher' (text sampled from the model), a text or "
                        ".jsonl file, or a datasets folder (default: teacher)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def cmd_decompose(args) -> int:
    import flexrank
    from flexrank.report import format_table

    started = time.perf_counter()
    model, tokenizer = flexrank.load_model(args.model)
    loaded = time.perf_counter()
    batches = flexrank.calibration_data(tokenizer, source=args.calib, model=model,
                                        num_samples=args.samples, seq_len=args.seq_len,
                                        seed=args.seed, batch_size=args.batch_size)
    calibrated = time.perf_counter()
    stats = flexrank.collect_covariances(model, batches)
    collected = time.perf_counter()
    reports = flexrank.factorize_(model, stats, flexrank.FactorizeConfig(
        include_lm_head=args.include_lm_head))
    done = time.perf_counter()
    fractions = (0.25, 0.5, 0.75)
    rows = [[r.name, f"{r.shape[0]}x{r.shape[1]}", r.max_rank,
             "data" if r.whitened else "plain",
             *[r.relative_error_at(f) for f in fractions]] for r in reports]
    print(format_table(["layer", "shape", "max rank", "svd",
                        *[f"rel. err @{int(f * 100)}% rank" for f in fractions]], rows,
                       title=f"\nDataSVD of {args.model}: {len(reports)} layers, "
                             f"{stats.num_tokens} calibration tokens"))
    stages = [["load", loaded - started], ["calibration data", calibrated - loaded],
              ["covariance", collected - calibrated], ["decompose", done - collected]]
    print(format_table(["stage", "seconds"], stages, title="\nStages"))
    return 0


def _budgets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets {text!r}: give numbers like 1,0.8,0.6") from None


def compress_config(args) -> CompressConfig:
    from flexrank.probe import ProbeConfig

    return CompressConfig(
        calib=args.calib, num_samples=args.samples, seq_len=args.seq_len,
        eval_samples=args.eval_samples, batch_size=args.batch_size, budgets=args.budgets,
        probe=ProbeConfig(mode=args.probe_mode, num_levels=args.levels,
                          rank_multiple=args.rank_multiple),
        probe_samples=args.probe_samples,
        distill=DistillConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr,
                              sampler=args.sampler, grad_accum=args.grad_accum,
                              seed=args.seed),
        seed=args.seed)


def add_compress_args(p: argparse.ArgumentParser) -> None:
    _add_calibration_args(p)
    p.add_argument("--eval-samples", type=int, default=16,
                   help="held-out sequences for the summary table")
    p.add_argument("--budgets", type=_budgets, default=(1.0, 0.8, 0.6, 0.4),
                   help="comma-separated budgets in (0, 1] (default 1,0.8,0.6,0.4)")
    p.add_argument("--probe-mode", choices=("fast", "exact"), default="fast")
    p.add_argument("--levels", type=int, default=16, help="candidate ranks per layer")
    p.add_argument("--rank-multiple", type=int, default=8)
    p.add_argument("--probe-samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=200,
                   help="distillation steps (sandwich: the largest, the smallest and one other "
                        "budget each step)")
    p.add_argument("--train-batch", type=int, default=4, help="sequences per step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=DistillConfig.lr)
    p.add_argument("--sampler", choices=("uniform", "sandwich"), default=DistillConfig.sampler)


def cmd_compress(args) -> int:
    from flexrank.pipeline import compress

    _, summary = compress(args.model, args.output, compress_config(args))
    print(summary)
    print(f"\nelastic checkpoint: {args.output}/elastic")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from flexrank.elastic import ElasticModel
    from flexrank.evaluate import bundle_decoders, evaluate_elastic, evaluate_models, tokenize_text
    from flexrank.exporters.manifest import MANIFEST_FILE, load_manifest
    from flexrank.report import format_table

    path = Path(args.path)
    text = Path(args.text).read_text(encoding="utf-8")
    if (path / MANIFEST_FILE).is_file():
        manifest = load_manifest(path)
        model_id = manifest.get("model_id")
        teacher, tokenizer = _teacher(model_id, args.no_teacher)
        if tokenizer is None:
            from transformers import AutoTokenizer
            folder = path / manifest["budgets"][0]["graph"]
            tokenizer = AutoTokenizer.from_pretrained(folder.parent, local_files_only=True)
        ids = tokenize_text(tokenizer, text, args.max_tokens)
        results = evaluate_models(bundle_decoders(path), teacher, ids, args.seq_len, args.stride)
        source = f"bundle {path} (onnxruntime)"
    else:
        elastic = ElasticModel.from_pretrained(path)
        if elastic.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer: perplexity needs one")
        teacher, _ = _teacher(elastic.model_id, args.no_teacher)
        ids = tokenize_text(elastic.tokenizer, text, args.max_tokens)
        results = evaluate_elastic(elastic, teacher, ids, seq_len=args.seq_len,
                                   stride=args.stride)
        source = f"elastic checkpoint {path} (PyTorch)"
    keys = ["ppl"] + (["kl", "top1"] if teacher is not None else [])
    rows = [[beta] + [row[k] for k in keys] for beta, row in sorted(results.items())]
    print(format_table(["budget", *keys], rows,
                       title=f"\n{source}: {len(ids)} tokens of {args.text}, windows of "
                             f"{args.seq_len}"))
    return 0


def _teacher(model_id, skip: bool):
    """The original model, for KL/top-1, when its id still loads (an alias or a path)."""
    if skip or not model_id:
        return None, None
    from flexrank.models import ModelLoadError, load_model
    try:
        return load_model(model_id)
    except ModelLoadError:
        logger.warning("original model %r not found: reporting perplexity only", model_id)
        return None, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexrank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decompose", help="load a model, calibrate, DataSVD every linear layer "
                                         "and print a per-layer table")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"alias ({', '.join(ALIASES)}), HF folder or .gguf (default: "
                        f"{DEFAULT_MODEL})")
    _add_calibration_args(p)
    p.add_argument("--include-lm-head", action="store_true")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("compress", help="decompose, plan and distill a model into an elastic "
                                        "checkpoint (resumable)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("-o", "--output", required=True, help="output folder (resumes if present)")
    add_compress_args(p)
    p.set_defaults(func=cmd_compress)

    from flexrank.deploy_cli import add_export_args, cmd_export, cmd_profiles
    from flexrank.tiers import DEFAULT_PROFILES, cmd_bench

    p = sub.add_parser("export", help="pick a budget for a device profile, export it, validate "
                                      "it and measure it (= flexrank-export)")
    add_export_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="per device tier: measured host figures and predicted "
                                     "device figures of a bundle, as a table and a PNG plot")
    p.add_argument("dist_dir", help="bundle folder written by flexrank-export")
    p.add_argument("--profiles", default=DEFAULT_PROFILES,
                   help=f"comma-separated profile names or YAML files (default: "
                        f"{DEFAULT_PROFILES})")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens timed per budget")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profiles", help="list the shipped device profiles and their targets")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("eval", help="perplexity (and KL / top-1 to the original model) of an "
                                    "elastic checkpoint or a per-budget ONNX bundle, per budget")
    p.add_argument("path", help="ELASTIC_DIR (scored in PyTorch) or DIST_DIR (onnxruntime)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--stride", type=int, default=None, help="default: seq-len")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--no-teacher", action="store_true",
                   help="skip KL / top-1 (do not load the original model)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def export_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["export", *argv])
