"""8da4w per-layer forms by measured error (issue 16, `ExecutorchExportConfig.form_slack`):
quality and stored weights of SmolLM2-135M in eager 8da4w (the program computes the eager
model, tests/test_executorch_8da4w.py) with today's rule (plain factors or dense by cost,
`forms.quantized_policy`) against the forms chosen at several slacks.

    cd benchmarks && flock /tmp/heavy.lock ../.venv/bin/python bench_8da4w_forms.py \
        ~/.cache/flexrank/bench-int4/elastic-b05 --budgets 0.8,0.5 --slacks 1,1.1,1.25,1.5

Per budget: the chooser's errors are measured once (they do not depend on the slack),
then each variant's deployed model is quantized as the export does (`linear_forms_`,
`quantize_8da4w_`, 8-bit embedding) and run on held-out tinyshakespeare (last 10 %,
`--eval-tokens` in windows of 256): perplexity, top-1 agreement with the fp32 dense model
and with the float model at the same ranks, and the stored weights of the factorised
layers (int4 + a bfloat16 scale per 32: 4.5 bits each). One thread, as the tests run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from bench_int4 import dense_folder, heldout_ids, markdown_table

from flexrank.compress.elastic import ElasticModel
from flexrank.exporters.common.form_choice import calibration_ids, cheapest_within
from flexrank.exporters.common.forms import FormPolicy, deployable_model, quantized_policy
from flexrank.exporters.common.sample import sample_for
from flexrank.exporters.executorch.export import ExecutorchExportConfig, exported_ranks
from flexrank.exporters.executorch.forms_8da4w import choose_forms_8da4w
from flexrank.exporters.executorch.quant import linear_forms_, quantize_8da4w_
from flexrank.exporters.executorch.validate import at_ranks
from flexrank.io import write_json_atomic

WINDOW = 256


@torch.no_grad()
def evaluate(model, windows) -> tuple[float, np.ndarray]:
    """(perplexity, argmax (positions,)) of `model` on the windows, next-token."""
    nll, count, argmax = 0.0, 0, []
    for window in windows:
        ids = torch.tensor(window)[None]
        logits = model(input_ids=ids).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(window) - 1
        argmax.append(logits.argmax(-1).numpy())
    return float(np.exp(nll / count)), np.concatenate(argmax)


def quantized(elastic, ranks, layer_forms, group: int):
    twin, records = deployable_model(elastic.model, ranks,
                                     policy=quantized_policy(FormPolicy()),
                                     layer_forms=layer_forms)
    linear_forms_(twin)
    quantize_8da4w_(twin, list(ranks), group, 8)
    return twin, records


def run(args) -> dict:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    ids = heldout_ids(dense_folder(), args.eval_tokens)
    windows = [ids[i:i + WINDOW] for i in range(0, len(ids) - 1, WINDOW)]
    dense = AutoModelForCausalLM.from_pretrained(dense_folder(), dtype=torch.float32).eval()
    dense_ppl, dense_top = evaluate(dense, windows)
    del dense
    elastic = ElasticModel.from_pretrained(args.checkpoint)
    config = ExecutorchExportConfig()
    sample = sample_for("decoder", elastic.model, elastic.tokenizer, None, config)
    started = time.perf_counter()
    calibration = calibration_ids(elastic, sample)
    results = {"dense_ppl": dense_ppl, "calibration_s": time.perf_counter() - started,
               "budgets": {}}
    for beta in args.budgets:
        ranks = exported_ranks(elastic, beta, "8da4w", args.group)
        with at_ranks(elastic.model, ranks) as model:
            float_ppl, float_top = evaluate(model, windows)
        started = time.perf_counter()
        measured = choose_forms_8da4w(elastic.model, ranks, calibration, 1.0, args.group)
        choose_s = time.perf_counter() - started
        variants = {"rule": {}}
        for slack in args.slacks:
            variants[f"slack {slack:g}"] = {
                name: cheapest_within(c["errors"], c["params"], slack)
                for name, c in measured.items()}
        rows = {}
        for label, layer_forms in variants.items():
            twin, records = quantized(elastic, ranks, layer_forms, args.group)
            ppl, top = evaluate(twin, windows)
            low = [r for r in records if r.name in measured]
            rows[label] = {
                "ppl": ppl, "top1_dense": float((top == dense_top).mean()),
                "top1_float": float((top == float_top).mean()),
                "forms": dict(Counter(r.form for r in low)),
                "params_M": sum(r.params for r in records) / 1e6,
                "low_rank_params_M": sum(r.params for r in low) / 1e6,
                "mean_error": float(np.mean([measured[r.name]["errors"][r.form]
                                             for r in low]))}
            del twin
            print(beta, label, json.dumps(rows[label]), flush=True)
        results["budgets"][str(beta)] = {
            "float_ppl": float_ppl, "float_top1_dense": float((float_top == dense_top).mean()),
            "choose_s": choose_s, "layers_below_full_rank": len(measured),
            "median_errors": {f: float(np.median([c["errors"][f] for c in measured.values()
                                                  if f in c["errors"]]))
                              for f in ("dense", "plain", "gauge")},
            "variants": rows}
    return results


def report(results: dict) -> str:
    rows = []
    for beta, entry in results["budgets"].items():
        rows.append([beta, "float (no quantization)", f"{entry['float_ppl']:.2f}",
                     f"{entry['float_top1_dense']:.3f}", "1.000", "", "", ""])
        for label, v in entry["variants"].items():
            forms = ", ".join(f"{k} {n}" for k, n in sorted(v["forms"].items()))
            rows.append([beta, label, f"{v['ppl']:.2f}", f"{v['top1_dense']:.3f}",
                         f"{v['top1_float']:.3f}", f"{v['mean_error']:.4f}",
                         f"{v['low_rank_params_M']:.2f}", forms])
    return markdown_table(["β", "forms", "ppl", "top-1 vs fp32 dense", "top-1 vs float at β",
                           "mean layer error", "low-rank layers' weights (M)", "forms chosen"],
                          rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.8, 0.5])
    parser.add_argument("--slacks", type=lambda s: [float(x) for x in s.split(",")],
                        default=[1.0, 1.1, 1.25, 1.5])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("/tmp/flexrank-8da4w-forms.json"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    write_json_atomic(args.out, results)
    print(report(results))
    print(f"dense fp32 ppl {results['dense_ppl']:.2f}; calibration ids "
          f"{results['calibration_s']:.0f} s; results in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
