"""Issues 15/16: quantization-aware nested distillation (`DistillConfig.qat`) on SmolLM2-135M.

    .venv/bin/python benchmarks/bench_qat.py --out /tmp/flexrank-qat \
        --checkpoint ~/.cache/flexrank/compress/smollm2-135m-...-fast/elastic \
        [--scheme int4] [--steps 16] [--batch 2] [--seq-len 128] [--lr 2e-5] \
        [--eval-tokens 2048]

From one elastic checkpoint (the start), two continuations with the same data, seed,
steps and learning rate: plain nested distillation, and the same with `qat=SCHEME`
(every budget's forward uses the weights its SCHEME export ships: compress/qat.py). Both
are saved as elastic checkpoints (OUT/plain/elastic, OUT/qat/elastic; the second records
its qat), ready for `benchmarks/bench_int4.py --checkpoint qat=OUT/qat/elastic`.

Measured in PyTorch, in this process: perplexity at every budget on the first
--eval-tokens tokens of the last 10 % of tinyshakespeare (windows of 256,
`flexrank.compress.evaluate.perplexity`), in float and with the SCHEME weights
(`flexrank.compress.qat.fake_quantized`, which equals the exported int4 graph's logits
at accuracy level 0: tests/test_qat.py), for the start and both continuations.
Training text: tinyshakespeare's first 80 % (sequences of --seq-len tokens).
Writes OUT/results.json and prints the table. Memory: the teacher, one student, its
gradients and AdamW's two moments (SmolLM2's factors at max rank: about 3.6 GB).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from common import CALIBRATION_SPAN, HELDOUT_SPAN, SHAKESPEARE

from flexrank.compress.config import DistillConfig
from flexrank.compress.distill import distill
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.evaluate import perplexity
from flexrank.compress.models import load_model
from flexrank.compress.qat import QuantSpec, fake_quantized
from flexrank.io import write_json_atomic
from flexrank.table import format_table


def token_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer(SHAKESPEARE.read_text(), return_tensors="pt")["input_ids"][0]
    return ids


def span(ids: torch.Tensor, fractions) -> torch.Tensor:
    return ids[int(fractions[0] * len(ids)):int(fractions[1] * len(ids))]


def train_batches(ids: torch.Tensor, seq_len: int, batch: int) -> list[dict]:
    usable = len(ids) // seq_len * seq_len
    rows = ids[:usable].reshape(-1, seq_len)  # (N, T)
    return [{"input_ids": rows[i:i + batch], "attention_mask": torch.ones_like(rows[i:i + batch])}
            for i in range(0, len(rows) - batch + 1, batch)]


def evaluate(model, elastic: ElasticModel, ids: torch.Tensor, spec: QuantSpec) -> dict:
    """{β: {"float": ppl, scheme: ppl}}."""
    out = {}
    for beta in elastic.budgets:
        elastic.set_budget(beta)
        with torch.no_grad():
            row = {"float": perplexity(model, ids, 256)}
            with fake_quantized(model, spec):
                row[spec.scheme] = perplexity(model, ids, 256)
        out[beta] = row
        logging.info("β=%g %s", beta, row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--scheme", choices=("int4", "8da4w"), default="int4")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=DistillConfig.lr)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--runs", default="plain,qat",
                   help="which continuations, in this order: plain, qat (comma-separated)")
    p.add_argument("--full-budget-plain", default="anchor", choices=("anchor", "refit", "train"),
                   help="DistillConfig.full_budget of the plain run (default: the compress "
                        "default, which keeps β = 1 the original model in float)")
    p.add_argument("--full-budget-qat", default="train", choices=("anchor", "refit", "train"),
                   help="DistillConfig.full_budget of the QAT run (default train: an anchored "
                        "full budget is refit in float, not for 4 bits)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    teacher, tokenizer = load_model("smollm2-135m")
    teacher.eval()
    ids = token_ids(tokenizer)
    held_out = span(ids, HELDOUT_SPAN)[:args.eval_tokens]
    batches = train_batches(span(ids, CALIBRATION_SPAN), args.seq_len, args.batch)
    start = ElasticModel.from_pretrained(args.checkpoint)
    spec = QuantSpec(args.scheme)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}

    started = time.perf_counter()
    results["runs"]["start"] = {"ppl": evaluate(start.model, start, held_out, spec)}
    results["runs"]["start"]["seconds"] = time.perf_counter() - started
    plan, model_id, budgets = start.plan, start.model_id, start.budgets
    del start  # each run reads its own copy: one student in memory at a time
    runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    if not runs or set(runs) - {"plain", "qat"}:
        p.error(f"--runs {args.runs!r}: give plain and/or qat, comma-separated")
    for name in runs:
        qat = args.scheme if name == "qat" else None
        full_budget = args.full_budget_qat if qat else args.full_budget_plain
        config = DistillConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, qat=qat,
                               checkpoint_every=0, mixed_precision="no", full_budget=full_budget)
        student = ElasticModel.from_pretrained(args.checkpoint).model
        started = time.perf_counter()
        distill(student, teacher, plan, batches, config)
        trained = time.perf_counter() - started
        elastic = ElasticModel(student, plan, tokenizer, model_id,
                               qat={"scheme": qat, "block_size": 32} if qat else None)
        elastic.save_pretrained(args.out / name / "elastic")
        results["runs"][name] = {"train_seconds": trained, "full_budget": full_budget,
                                 "ppl": evaluate(student, elastic, held_out, spec)}
        write_json_atomic(args.out / "results.json", results)
        del student, elastic

    rows = []
    for beta in budgets:
        row = [beta]
        for name in ("start", *runs):
            ppl = results["runs"][name]["ppl"][beta]
            row += [ppl["float"], ppl[args.scheme]]
        rows.append(row)
    headers = ["β"] + [f"{run} {precision}" for run in ("start", *runs)
                       for precision in ("fp32", args.scheme)]
    print(format_table(headers, rows, title=f"\nSmolLM2-135M perplexity, {len(held_out)} "
                                            f"held-out tinyshakespeare tokens; {args.steps} "
                                            f"steps each (batch {args.batch} x {args.seq_len})"))
    print(json.dumps({k: v.get("train_seconds") for k, v in results["runs"].items()}))


if __name__ == "__main__":
    main()
