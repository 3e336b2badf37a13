"""Quality of every method at the same deployed parameter count on SmolLM2-135M:
dense, plain SVD + uniform ranks, DataSVD + uniform ranks (ASVD/SVD-LLM style), DataSVD +
FlexRank's plan (no training), and FlexRank distilled. Held-out: the last 10 % of
tinyshakespeare; calibration and training: the first 80 %.

The plan is nested over seven budgets, but distillation trains only four of them
(TRAINED_BUDGETS: the sampler gives the others weight 0), so the rows at 0.9 / 0.7 / 0.5
show budgets FlexRank never saw in training. The default sampler is sandwich (β = 1 and
0.4 every step, plus 0.6 or 0.8): β = 1 in every step keeps the shared factors from
drifting away from the dense model, which one budget per step at lr 1e-4 did.

    .venv/bin/python benchmarks/bench_quality.py --out /tmp/flexrank-bench \
        [--samples 64 --seq-len 256 --steps 100 --train-batch 2 --eval-tokens 8192]

The compress stages are cached in --out, so a second run only re-evaluates. Prints the
stage times, the plan summary and one perplexity table (also written as JSON to --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import HELDOUT_SPAN, SHAKESPEARE, PeakRSS

import flexrank
from flexrank.compress.config import CompressConfig, DistillConfig, FactorizeConfig, ProbeConfig
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.evaluate import perplexity, teacher_agreement, tokenize_text
from flexrank.compress.pipeline import STATE_FILE, compress
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.planning.baselines import uniform_ranks
from flexrank.planning.planner import NestedPlan
from flexrank.table import format_table

BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
TRAINED_BUDGETS = (1.0, 0.8, 0.6, 0.4)  # the others are planned but never trained


def held_out_ids(tokenizer, max_tokens: int) -> torch.Tensor:
    ids = tokenize_text(tokenizer, SHAKESPEARE.read_text())
    start = round(HELDOUT_SPAN[0] * len(ids))
    return ids[start:start + max_tokens]


def trained_weights() -> tuple[float, ...]:
    """Sampler weights in the plan's (ascending) budget order: 1 trained, 0 never seen."""
    return tuple(float(b in TRAINED_BUDGETS) for b in sorted(BUDGETS))


def set_ranks(model, ranks: dict[str, int]) -> None:
    for name, layer in nested_layers(model).items():
        layer.rank = ranks[name]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/flexrank-bench")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="0: no distillation")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--sampler", choices=("weighted", "sandwich"), default="sandwich",
                        help="weighted: one trained budget per step; sandwich: the largest, "
                             "the smallest and one trained budget between them")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--skip-baselines", action="store_true",
                        help="evaluate only dense and distilled (baselines: a --steps 0 run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)

    config = CompressConfig(
        calib=str(SHAKESPEARE), num_samples=args.samples, seq_len=args.seq_len,
        eval_samples=8, batch_size=8, budgets=BUDGETS,
        probe=ProbeConfig(mode="fast", num_levels=16, probe_points=3, top_k=0), probe_samples=2,
        distill=DistillConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr,
                              warmup_steps=10, checkpoint_every=20, sampler=args.sampler,
                              budget_weights=trained_weights()))
    with PeakRSS() as rss:
        elastic, summary = compress("smollm2-135m", out, config)
    print(summary)
    stage_times = json.loads((out / STATE_FILE).read_text())["done"]
    plan = NestedPlan.load(out / "stages" / "plan.json")
    print("\n" + plan.summary_table())

    teacher, tokenizer = flexrank.load_model("smollm2-135m")
    ids = held_out_ids(tokenizer, args.eval_tokens)
    results: dict[str, dict[float, float]] = {"dense": {1.0: perplexity(teacher, ids)}}
    agreement: dict[str, dict[float, dict]] = {}

    # DataSVD factors before distillation: the decompose stage's cache
    from safetensors.torch import load_model as load_st

    from flexrank.compress.elastic import restructure_
    from flexrank.compress.pipeline import _safetensors_meta

    decomposed = copy.deepcopy(teacher)
    path = out / "stages" / "decomposed.safetensors"
    restructure_(decomposed, json.loads(_safetensors_meta(path)))
    load_st(decomposed, str(path), strict=False)
    plain = copy.deepcopy(teacher)
    if not args.skip_baselines:
        factorize_(plain, None, FactorizeConfig(method="plain"))

    layers = nested_layers(decomposed)
    shapes = [(layer.U.shape[0], layer.V.shape[0]) for layer in layers.values()]
    methods = {"plain SVD, uniform": plain, "DataSVD, uniform": decomposed}
    if args.skip_baselines:
        methods = {}
    for name, model in methods.items():
        results[name] = {}
        for beta in BUDGETS:
            set_ranks(model, dict(zip(layers, uniform_ranks(shapes, beta), strict=True)))
            results[name][beta] = perplexity(model, ids)
    results["DataSVD + plan"] = {}
    planned = ElasticModel(decomposed, plan)
    for beta in BUDGETS if not args.skip_baselines else ():
        planned.set_budget(beta)
        results["DataSVD + plan"][beta] = perplexity(decomposed, ids)
    if args.steps == 0:  # no distillation asked: the elastic model is DataSVD + plan
        elastic = None
    else:
        results["FlexRank distilled"] = {}
        agreement["FlexRank distilled"] = {}
    for beta in BUDGETS if elastic is not None else ():
        elastic.set_budget(beta)
        results["FlexRank distilled"][beta] = perplexity(elastic.model, ids)
        agreement["FlexRank distilled"][beta] = teacher_agreement(elastic.model, teacher, ids)

    rows = [[name] + [per.get(b, float("nan")) for b in BUDGETS] for name, per in results.items()]
    print(format_table(["method"] + [f"β={b:g}" for b in BUDGETS], rows,
                       title=f"\nHeld-out perplexity, tinyshakespeare last 10 %, "
                             f"{len(ids)} tokens, windows of 256"))
    tokens_seen = args.steps * args.train_batch * args.seq_len
    print(f"\ndistillation: {args.steps} steps x {args.train_batch} x {args.seq_len} = "
          f"{tokens_seen} tokens; peak RSS of the compress run {rss.peak / 1e9:.2f} GB")
    report = {"stages": stage_times, "ppl": {k: {str(b): v for b, v in per.items()}
                                              for k, per in results.items()},
              "agreement": {k: {str(b): v for b, v in per.items()}
                            for k, per in agreement.items()},
              "tokens_seen": tokens_seen, "peak_rss_gb": rss.peak / 1e9,
              "trained_budgets": list(TRAINED_BUDGETS), "args": vars(args),
              "finished": time.strftime("%Y-%m-%d %H:%M")}
    (out / f"quality-steps{args.steps}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
