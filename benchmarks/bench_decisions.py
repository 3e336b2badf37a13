"""The `--budget auto --precision auto` decision of every shipped profile for one elastic
checkpoint (issue 17): predicted figures, measured quality and size in one table.

    .venv/bin/python benchmarks/bench_decisions.py ~/.cache/flexrank/compress/<run>/elastic

Quality per (β, precision) comes from the checkpoint's flexrank-quality.json, measured
(and stored) first when missing, as flexrank-export does.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="elastic checkpoint folder (a compress run's elastic/)")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--verbose", action="store_true", help="print every decision table")
    p.add_argument("--quality", help="a JSON list of quality rows to use instead of the "
                                     "checkpoint's (nothing is measured)")
    args = p.parse_args()

    from flexrank.compress.budget_cost import budget_costs
    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.models import load_model
    from flexrank.compress.quality import PRECISIONS, quality_rows
    from flexrank.device.decide import Candidate, Constraints, Quality, decide
    from flexrank.device.profiles import list_profiles

    folder = Path(args.checkpoint).expanduser()
    elastic = ElasticModel.from_pretrained(folder)
    if args.quality:
        import json

        rows, note = json.loads(Path(args.quality).read_text()), f"read from {args.quality}"
    else:
        rows, note = quality_rows(elastic, folder, PRECISIONS,
                                  lambda: load_model(elastic.model_id)[0].eval())
    print(f"quality: {note}")
    measured = {(float(r["beta"]), r["precision"]): r for r in rows}
    costs = {prec: budget_costs(elastic, None if prec == "fp32" else prec) for prec in PRECISIONS}
    print("| profile | runtimes | chosen runtime → artifact | binding limits | chosen β | "
          "precision | ppl | KL | "
          "size MB | decode tok/s (pred.) | TTFT s (pred.) | memory GB (pred.) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    answers = set()
    for profile in list_profiles():
        if profile.tier == "host":
            continue
        candidates = []
        for prec in profile.precisions():
            for cost in costs[prec]:
                row = measured.get((float(cost.beta), prec))
                quality = None if row is None else Quality(row["ppl"], row.get("kl"))
                candidates.append(Candidate(cost, prec, quality))
        decision = decide(candidates, profile, Constraints(quality_tolerance=args.tolerance))
        if args.verbose:
            print(decision.table())
        runtimes = " + ".join(r for r, _ in profile.runtimes())
        limits = ", ".join(f"{k} {v.value:g}" for k, v in decision.limits.items()
                           if k in ("memory", "size"))
        c = decision.chosen
        if c is None:
            print(f"| {profile.name} | {runtimes} | - | {limits} | none | - | "
                  f"- | - | - | - | - | - |")
            continue
        answers.add((c.beta, c.precision))
        q = c.quality
        artifact = ".pte" if c.runtime == "executorch" else ".onnx"
        print(f"| {profile.name} | {runtimes} | {c.runtime} → {artifact} | {limits} | {c.beta:g} | "
              f"{c.precision} | {'-' if q is None else f'{q.ppl:.1f}'} | "
              f"{'-' if q is None or q.kl is None else f'{q.kl:.3f}'} | {c.size_mb:.1f} | "
              f"{c.prediction.decode_tokens_per_s:.0f} | {c.prediction.ttft_s:.3f} | "
              f"{c.prediction.memory_bytes / 1e9:.3f} |")
    print(f"\n{len(answers)} different (β, precision) answers: "
          + ", ".join(f"β {b:g} {p}" for b, p in sorted(answers, reverse=True)))


if __name__ == "__main__":
    main()
