"""`flexrank compress MODEL -o ELASTIC_DIR`: decompose, plan and distill into an elastic
checkpoint (resumable); also the calibration arguments shared with `decompose`."""

from __future__ import annotations

import argparse

from flexrank.compress.aliases import DEFAULT_MODEL
from flexrank.compress.config import CompressConfig, DistillConfig


def _budgets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets {text!r}: give numbers like 1,0.8,0.6") from None


def compress_config(args) -> CompressConfig:
    from flexrank.compress.config import ProbeConfig

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
    add_calibration_args(p)
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
    from flexrank.compress.pipeline import compress

    _, summary = compress(args.model, args.output, compress_config(args))
    print(summary)
    print(f"\nelastic checkpoint: {args.output}/elastic")
    return 0


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="teacher",
                   help="calibration source: 'teacher' (text sampled from the model), a text or "
                        ".jsonl file, or a datasets folder (default: teacher)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="decompose, plan and distill a model into an elastic "
                                        "checkpoint (resumable)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("-o", "--output", required=True, help="output folder (resumes if present)")
    add_compress_args(p)
    p.set_defaults(func=cmd_compress)
