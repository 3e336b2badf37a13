"""`flexrank decompose MODEL`: calibrate, DataSVD every linear layer and print the
per-layer error table."""

from __future__ import annotations

import time

from flexrank.cli.compress import add_calibration_args
from flexrank.compress.aliases import ALIASES, DEFAULT_MODEL


def cmd_decompose(args) -> int:
    import flexrank
    from flexrank.table import format_table

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


def add_parser(sub) -> None:
    p = sub.add_parser("decompose", help="load a model, calibrate, DataSVD every linear layer "
                                         "and print a per-layer table")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"alias ({', '.join(ALIASES)}), HF folder or .gguf (default: "
                        f"{DEFAULT_MODEL})")
    add_calibration_args(p)
    p.add_argument("--include-lm-head", action="store_true")
    p.set_defaults(func=cmd_decompose)
