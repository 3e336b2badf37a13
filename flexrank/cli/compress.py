"""`flexrank compress MODEL -o ELASTIC_DIR`: decompose, plan and distill into an elastic
checkpoint (resumable); also the calibration arguments shared with `decompose`."""

from __future__ import annotations

import argparse
import math

from flexrank.compress.aliases import DEFAULT_MODEL
from flexrank.compress.config import (
    CompressConfig,
    DepthConfig,
    DistillConfig,
    ProbeConfig,
    check_budgets,
)


def _comma_list(text: str, convert, what: str, example: str) -> list:
    """The comma-separated items of `text`, each `convert`ed; ArgumentTypeError naming the
    item that is not `what` and showing `example`."""
    values = []
    for part in text.split(","):
        try:
            values.append(convert(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} in {text!r} is not {what}: give {example}") from None
    return values


def budget_list(text: str) -> tuple[float, ...]:
    """argparse type for `--budgets 1,0.8,0.6`: distinct numbers in (0, 1], in any order
    (argparse names the option in front of the error)."""
    values = _comma_list(text, float, "a number", "budgets like 1,0.8,0.6")
    try:
        check_budgets(tuple(values))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return tuple(values)


def budget_weight_pairs(text: str) -> dict[float, float]:
    """argparse type for `--budget-weights 0.6:0.5,0.8:0.45,0.4:0.05`: β:weight pairs, each
    weight a finite number >= 0 (budgets left out get weight 0)."""
    def pair(item: str) -> tuple[float, float]:
        beta, sep, weight = item.partition(":")
        if not sep:
            raise ValueError(item)
        beta, weight = float(beta), float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(item)
        return beta, weight
    pairs = _comma_list(text, pair, "a budget:weight pair with a weight >= 0",
                        "pairs like 0.6:0.5,0.8:0.45,0.4:0.05")
    twice = sorted({beta for beta, _ in pairs if [b for b, _ in pairs].count(beta) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r} weighs budget(s) {twice} more than once: "
                                         "give each budget one weight")
    return dict(pairs)


def budget_weights(args) -> tuple[float, ...] | None:
    """--budget-weights as DistillConfig.budget_weights (one per budget, ascending budgets);
    ValueError, naming the options, for a β that is not one of --budgets, weights that are
    all 0, weights with --sampler uniform (which reads none) or --sampler weighted without
    them."""
    if args.budget_weights is None:
        if args.sampler == "weighted":
            raise ValueError("--sampler weighted draws one budget a step by --budget-weights: "
                             "give them, e.g. --budget-weights 0.6:0.5,0.8:0.5")
        return None
    if args.sampler == "uniform":
        raise ValueError("--budget-weights is read by --sampler weighted and sandwich, not "
                         "uniform: choose one of those, or leave the weights out")
    unknown = sorted(set(args.budget_weights) - set(args.budgets))
    if unknown:
        raise ValueError(f"--budget-weights names budget(s) {unknown} that --budgets "
                         f"{','.join(f'{b:g}' for b in args.budgets)} does not have: add "
                         "them to --budgets or leave them out of --budget-weights (budgets "
                         "left out get weight 0)")
    if not any(args.budget_weights.values()):
        raise ValueError(f"--budget-weights {args.budget_weights} gives every budget weight "
                         "0: weigh at least one")
    return tuple(args.budget_weights.get(beta, 0.0) for beta in sorted(args.budgets))


def whole_number(low: int):
    """argparse type: a whole number >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be >= {low}")
        return value
    return parse


def _number(text: str) -> float:
    """`text` as a float, or ArgumentTypeError saying it is not a number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be > 0")
    return value


def non_negative_number(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be >= 0")
    return value


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be in (0, 1) (a "
                                         "fraction of the blocks; some must stay as donors)")
    return value


def rank_list(text: str) -> tuple[int, ...]:
    """argparse type for `--adapter-ranks 8,16,32`: whole numbers >= 1, strictly ascending."""
    values = _comma_list(text, int, "a whole number", "ranks like 8,16,32,64")
    if min(values) < 1 or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range: ranks must be >= 1 and strictly ascending, like "
            "8,16,32,64")
    return tuple(values)


DEPTH_OPTIONS = {"max_replaced": "--max-replaced", "adapter_ranks": "--adapter-ranks",
                 "donor_window": "--donor-window"}


def depth_config(args) -> DepthConfig | None:
    """--depth's settings (DepthConfig's defaults for those not given); None without
    --depth. Raises ValueError for a depth option given without --depth."""
    given = {key: getattr(args, key) for key in DEPTH_OPTIONS
             if getattr(args, key, None) is not None}
    if not getattr(args, "depth", False):
        if given:
            raise ValueError(f"{', '.join(DEPTH_OPTIONS[k] for k in given)} set the depth "
                             "axis: add --depth (or leave them out for ranks only)")
        return None
    return DepthConfig(**given)


def compress_config(args) -> CompressConfig:
    if args.probe_samples > args.samples:
        raise ValueError(f"--probe-samples {args.probe_samples} is more than --samples "
                         f"{args.samples}: the probe runs on some of the calibration sequences")
    return CompressConfig(
        calib=args.calib, num_samples=args.samples, seq_len=args.seq_len,
        eval_samples=args.eval_samples, batch_size=args.batch_size, budgets=args.budgets,
        probe=ProbeConfig(mode=args.probe_mode, num_levels=args.levels,
                          rank_multiple=args.rank_multiple, probe_points=args.probe_points,
                          top_k=args.probe_top_k, fisher_draws=args.fisher_draws,
                          fisher_points=args.fisher_points),
        probe_samples=args.probe_samples,
        distill=DistillConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr,
                              sampler=args.sampler, budget_weights=budget_weights(args),
                              intermediate_weight=args.intermediate_weight,
                              balance_factors=args.balance_factors,
                              grad_accum=args.grad_accum,
                              seed=args.seed, qat=args.qat,
                              qat_block_size=args.qat_block_size,
                              full_budget=full_budget(args)),
        seed=args.seed, offload_hidden=args.offload_hidden, depth=depth_config(args))


DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_dtype(name: str):
    """--dtype as a torch dtype, None for auto (the checkpoint's own)."""
    if name == "auto":
        return None
    import torch

    return getattr(torch, name)


def full_budget(args) -> str:
    """--full-budget, with 'auto' resolved: 'train' under --qat (an anchored β = 1 is refit
    to the original weights in float, which undoes its training for the 4-bit weights it
    ships with), else 'anchor' (β = 1 stays the original model: issue 17)."""
    if args.full_budget != "auto":
        return args.full_budget
    return "train" if args.qat else "anchor"


def add_compress_args(p: argparse.ArgumentParser) -> None:
    add_calibration_args(p)
    p.add_argument("--eval-samples", type=whole_number(0), default=16,
                   help="held-out sequences for the summary table")
    p.add_argument("--budgets", type=budget_list, default=(1.0, 0.8, 0.6, 0.4),
                   help="comma-separated budgets in (0, 1] (default 1,0.8,0.6,0.4)")
    p.add_argument("--probe-mode", choices=("auto", "fast", "exact", "fisher"),
                   default=str(ProbeConfig.mode),
                   help="fast: --probe-points ranks measured per layer, the rest from the "
                        "tail-energy curve; exact: every rank measured; fisher (language "
                        "models): every rank from a second-order estimate of the KL, a few "
                        "backward passes in all, scaled to --fisher-points measured ranks; "
                        "auto: fisher for language models, fast for the others "
                        f"(default {ProbeConfig.mode})")
    p.add_argument("--fisher-draws", type=whole_number(1), default=ProbeConfig.fisher_draws,
                   help="fisher mode: backward passes per probe batch, each with labels "
                        f"sampled from the model (default {ProbeConfig.fisher_draws})")
    p.add_argument("--fisher-points", type=whole_number(0), default=ProbeConfig.fisher_points,
                   help="fisher mode: ranks measured per layer to rescale the estimate "
                        f"(default {ProbeConfig.fisher_points}: the estimate alone)")
    p.add_argument("--levels", type=whole_number(2), default=16, help="candidate ranks per layer")
    p.add_argument("--rank-multiple", type=whole_number(1), default=8)
    p.add_argument("--probe-samples", type=whole_number(1), default=CompressConfig.probe_samples,
                   help="calibration sequences the probe runs on "
                        f"(default {CompressConfig.probe_samples})")
    p.add_argument("--probe-points", type=whole_number(1), default=ProbeConfig.probe_points,
                   help="ranks measured per layer in fast mode; the others are interpolated "
                        f"(default {ProbeConfig.probe_points})")
    p.add_argument("--probe-top-k", type=whole_number(0), default=ProbeConfig.top_k,
                   help="language models: probe KL over each token's top-k teacher tokens "
                        "(0: the whole vocabulary; the top-k skips most of the LM head, "
                        f"BENCHMARKS.md issue 20; default {ProbeConfig.top_k})")
    p.add_argument("--steps", type=whole_number(0), default=200,
                   help="distillation steps (sandwich: the largest, the smallest and one other "
                        "budget each step)")
    p.add_argument("--train-batch", type=whole_number(1), default=4, help="sequences per step")
    p.add_argument("--grad-accum", type=whole_number(1), default=1)
    p.add_argument("--lr", type=positive_number, default=DistillConfig.lr)
    p.add_argument("--sampler", choices=("uniform", "sandwich", "weighted"),
                   default=DistillConfig.sampler,
                   help="budgets trained each step: sandwich (the largest, the smallest and "
                        "one other), uniform (one, uniformly) or weighted (one, drawn by "
                        "--budget-weights)")
    p.add_argument("--budget-weights", type=budget_weight_pairs, default=None,
                   metavar="B:W,...",
                   help="β:weight pairs, e.g. 0.6:0.5,0.8:0.45,0.4:0.05: the probability of "
                        "each budget with --sampler weighted, of each as the middle one with "
                        "sandwich (which trains the smallest and the largest every step); "
                        "budgets left out are not drawn (BENCHMARKS.md: all-MiniLM-L6-v2's "
                        "goals were reached with weighted, one budget a step)")
    p.add_argument("--intermediate-weight", type=non_negative_number, default=0.0,
                   help="adds this weight x per-block hidden-state matching (token cosine + "
                        "normalised MSE of every block's output) to the output objective "
                        "(default 0: off)")
    p.add_argument("--balance-factors", action="store_true",
                   help="before distilling, scale each rank component's U and V columns to "
                        "equal norms (every budget unchanged; AdamW then moves both at one "
                        "pace: DataSVD left V's columns 30-87x smaller than U's on "
                        "all-MiniLM-L6-v2)")
    p.add_argument("--qat", choices=("int4", "8da4w"), default=None,
                   help="quantization-aware distillation: train every budget for the 4-bit "
                        "weights it ships with (int4: ONNX MatMulNBits, for --quantize int4; "
                        "8da4w: ExecuTorch, for --quantize 8da4w); recorded in the checkpoint")
    p.add_argument("--qat-block-size", type=whole_number(1), default=DistillConfig.qat_block_size,
                   help="the export's int4 block size or 8da4w group size (default 32)")
    p.add_argument("--full-budget", choices=("auto", "anchor", "refit", "train"), default="auto",
                   help="β = 1 in distillation: anchor (trained, then refit to the original "
                        "weights: β = 1 stays the original model), refit (not trained, refit), "
                        "train (trained like the others); auto: train with --qat (β = 1 "
                        "trained for its 4-bit weights), anchor otherwise")
    p.add_argument("--offload-hidden", metavar="DIR|auto", default=None,
                   help="keep the calibration hidden states of DataSVD in files in DIR, one "
                        "batch in memory at a time (the same factors); auto: in the output "
                        "folder when they would take over a quarter of the available memory "
                        "(default: in memory)")
    p.add_argument("--depth", action="store_true",
                   help="a second elastic axis (issue 18): whole blocks may be replaced by "
                        "stand-ins that share an unpruned block's weights plus low-rank "
                        "adapters; the plan chooses per budget which blocks and the ranks "
                        "of the rest (a joint plan)")
    p.add_argument("--max-replaced", type=open_fraction, default=None, metavar="F",
                   help=f"with --depth: fraction of the blocks that may be replaced, those "
                        f"that change their input least (default {DepthConfig.max_replaced})")
    p.add_argument("--adapter-ranks", type=rank_list, default=None, metavar="R1,R2,...",
                   help="with --depth: candidate adapter ranks of a stand-in (default "
                        f"{','.join(map(str, DepthConfig.adapter_ranks))})")
    p.add_argument("--donor-window", type=whole_number(1), default=None, metavar="N",
                   help="with --depth: the nearest kept blocks tried as each replaced "
                        f"block's donor (default {DepthConfig.donor_window})")


def cmd_compress(args) -> int:
    from flexrank.compress.pipeline import compress

    _, summary = compress(args.model, args.output, compress_config(args),
                          dtype=model_dtype(args.dtype))
    print(summary)
    print(f"\nelastic checkpoint: {args.output}/elastic")
    return 0


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="teacher",
                   help="calibration source: 'teacher' (text sampled from the model), a text or "
                        ".jsonl file, or a datasets folder (default: teacher)")
    p.add_argument("--samples", type=whole_number(1), default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=whole_number(2), default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=whole_number(1), default=8)
    p.add_argument("--seed", type=whole_number(0), default=0)


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="decompose, plan and distill a model into an elastic "
                                        "checkpoint (resumable)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("-o", "--output", required=True, help="output folder (resumes if present)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="load the model in this dtype: bfloat16/float16 halve the memory of "
                        "a large model (covariances, eigendecompositions and SVDs still run "
                        "in float64 per layer; factors keep the model's dtype); auto: the "
                        "checkpoint's own (float32 for the GGUF alias) (default: auto)")
    add_compress_args(p)
    p.set_defaults(func=cmd_compress)
