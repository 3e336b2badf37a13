"""Issue 20: cheaper probes of SmolLM2-135M against today's default, judged by the plans
they give. Each probe variant is run whole (teacher pass, block cache, every one of the
210 layers) on the same DataSVD factors, timed, planned at the same budgets, and every
plan's held-out perplexity (the factors truncated to the plan's ranks, no distillation)
is compared with the plan of the reference probe.

    .venv/bin/python benchmarks/bench_probe_plans.py \
        --out ~/.cache/flexrank/compress/smollm2-135m-24a601bcc1318977-fast

--out is a `flexrank compress` output folder whose stages/decomposed.safetensors holds
the factors. Each variant's sensitivity matrix is saved under --out/probe-variants/ with
its wall time, so a second run only plans and evaluates (delete a file to time it again;
a run that was interrupted resumes its layers but its time is then not a whole run's and
is marked so). Probe tokens: the first `samples` sequences of 256 tokens of the first
80 % of tinyshakespeare (other seeds or shorter sequences where a variant says so);
held-out: --eval-tokens tokens from its last 10 %.

`--rescaled 'tail@0,14'` runs no probe: it plans each layer's tail-energy curve (or a
saved variant's curves) rescaled to the reference's measured damage at the given levels,
so the choice of measured levels is judged apart from the tokens they are measured on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import CALIBRATION_SPAN, HELDOUT_SPAN, SHAKESPEARE
from safetensors.torch import load_model as load_st

import flexrank
from flexrank.compress.config import ProbeConfig
from flexrank.compress.elastic import restructure_
from flexrank.compress.evaluate import perplexity, tokenize_text
from flexrank.compress.pipeline import _safetensors_meta
from flexrank.compress.probe import _fill_from_curve, probe
from flexrank.compress.select import nested_layers
from flexrank.io import write_json_atomic
from flexrank.planning.planner import plan
from flexrank.planning.sensitivity import Sensitivity
from flexrank.table import format_table

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
# name: (probe configuration, probe sequences[, seed of the sequences' draw (0), their
# length in tokens (256)]); the first is the reference
VARIANTS = {
    # the default until 2026-12-02, pinned
    "default (3 points, 4 seq, full KL)": (ProbeConfig(probe_points=3, top_k=0), 4),
    "2 points, 2 seq, top-64": (ProbeConfig(probe_points=2, top_k=64), 2),
    "1 point, 2 seq, top-64": (ProbeConfig(probe_points=1, top_k=64), 2),
    "1 point, 4 seq, top-64": (ProbeConfig(probe_points=1, top_k=64), 4),
    "fisher, 4 seq, 8 draws": (ProbeConfig(mode="fisher", fisher_draws=8), 4),
    "fisher, 4 seq, 32 draws": (ProbeConfig(mode="fisher", fisher_draws=32), 4),
    "fisher + 1 point, 2 seq, top-64": (ProbeConfig(mode="fisher", fisher_points=1, top_k=64),
                                        2),
    "fisher + 2 points, 2 seq, top-64": (ProbeConfig(mode="fisher", fisher_points=2,
                                                     top_k=64), 2),
    "fisher, 2 seq, 128 draws": (ProbeConfig(mode="fisher", fisher_draws=128), 2),
    # the reference's own spread: the same probe on 4 other sequences
    "default on 4 other seq (seed 1)": (ProbeConfig(probe_points=3, top_k=0), 4, 1),
    "fisher, 4 seq, 64 draws": (ProbeConfig(mode="fisher", fisher_draws=64), 4),
    # the estimate's sampling noise is per sequence and draw: the same tokens in shorter
    # sequences give more independent terms
    "fisher, 16 seq of 64, 32 draws": (ProbeConfig(mode="fisher", fisher_draws=32), 16, 0, 64),
    "fisher, 8 seq of 128, 32 draws": (ProbeConfig(mode="fisher", fisher_draws=32), 8, 0, 128),
    # the new default (probe_points 1, top_k 64, 2 sequences) on the other seed's tokens,
    # to set beside "default on 4 other seq (seed 1)"
    "1 point, 2 other seq (seed 1), top-64": (ProbeConfig(probe_points=1, top_k=64), 2, 1),
}


@dataclass
class Bench:
    """What every variant is judged with: the DataSVD student, the teacher, the held-out
    tokens; `layers` are the student's nested layers."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    held_out: torch.Tensor
    layers: dict

    def probe_batches(self, samples: int, seed: int = 0, seq_len: int = 256) -> list:
        """`samples` sequences of `seq_len` tokens in batches of 512 tokens: the 256-token
        windows drawn with `seed` (seed 0: the first 4 are every earlier run's), each cut
        into 256 / seq_len consecutive pieces."""
        windows = flexrank.calibration_data(
            self.tokenizer, SHAKESPEARE, num_samples=max(4, samples * seq_len // 256),
            seq_len=256, seed=seed, span=CALIBRATION_SPAN, batch_size=1)
        ids = torch.cat([w["input_ids"] for w in windows]).reshape(-1, seq_len)[:samples]
        return [{"input_ids": part, "attention_mask": torch.ones_like(part)}
                for part in ids.split(512 // seq_len)]

    def evaluate(self, record: dict, file: Path | None = None) -> dict:
        """Plan a probe's sensitivity at BUDGETS; each plan's held-out perplexity (kept in
        `file`, the variant's record, for these budgets and held-out tokens)."""
        sens = Sensitivity.from_dict(record["sensitivity"])
        nested = plan(sens, budgets=list(BUDGETS))
        key = f"ppl {list(BUDGETS)} {len(self.held_out)} tokens"
        ppl = {float(b): p for b, p in record.get(key, {}).items()}
        if not ppl:
            for beta in BUDGETS:
                ranks = nested.ranks_for(beta)
                for layer_name, layer in self.layers.items():
                    layer.rank = ranks[layer_name]
                ppl[beta] = perplexity(self.student, self.held_out)
            for layer in self.layers.values():
                layer.rank = layer.max_rank
            if file is not None:
                write_json_atomic(file, {**record, key: {str(b): p for b, p in ppl.items()}})
        return {"seconds": record["seconds"], "whole_run": record["whole_run"],
                "ppl": ppl, "plan": nested, "errors": sens.errors}


def load_bench(out: Path, eval_tokens: int) -> Bench:
    """SmolLM2-135M, its DataSVD factors from `out`'s stages/decomposed.safetensors, and
    `eval_tokens` held-out tokens from the start of tinyshakespeare's last 10 %."""
    teacher, tokenizer = flexrank.load_model("smollm2-135m")
    student = copy.deepcopy(teacher)
    path = out / "stages" / "decomposed.safetensors"
    restructure_(student, json.loads(_safetensors_meta(path)))
    load_st(student, str(path), strict=False)
    ids = tokenize_text(tokenizer, SHAKESPEARE.read_text())
    start = round(HELDOUT_SPAN[0] * len(ids))
    return Bench(student, teacher, tokenizer, ids[start:start + eval_tokens],
                 nested_layers(student))


def variant_file(folder: Path, name: str) -> Path:
    return folder / f"variant-{list(VARIANTS).index(name)}.json"


def run_variant(bench: Bench, folder: Path, name: str, threads: int) -> dict:
    """The variant's probe record, from its file under `folder` or run (and timed) now."""
    config, samples, *where = VARIANTS[name]
    done = variant_file(folder, name)
    if done.is_file():
        return json.loads(done.read_text())
    partial = done.with_suffix(".partial.json")
    resumed = partial.is_file()
    begin, load = time.perf_counter(), os.getloadavg()[0]
    sens = probe(bench.student, bench.teacher, bench.probe_batches(samples, *where),
                 config, cache_path=partial)
    record = {"name": name, "seconds": time.perf_counter() - begin,
              "whole_run": not resumed, "samples": samples, "threads": threads,
              "load_average": [load, os.getloadavg()[0]],
              "config": config.to_dict(), "sensitivity": sens.to_dict()}
    done.write_text(json.dumps(record))
    partial.unlink()
    return record


def rescaled_sensitivity(bench: Bench, folder: Path, spec: str) -> tuple[str, Sensitivity]:
    """`spec` = 'CURVE@LEVELS': CURVE ('tail': each layer's tail energy; else a saved
    variant's curves, by name substring) rescaled to the reference's measured damage at
    LEVELS (and 0 at full rank), at the reference's ranks. Returns (a row name, it)."""
    measured = Sensitivity.from_dict(json.loads((folder / "variant-0.json").read_text())
                                     ["sensitivity"])
    curve_name, levels = spec.rsplit("@", 1)
    levels = [int(k) for k in levels.split(",")]
    if curve_name == "tail":
        # ‖U_j‖² = σ_j (U = P√σ); the tail energy at rank r is Σ_{j≥r} σ_j², as fast
        # mode's fill (probe._fill_from_tail) takes it
        sigma = {n: bench.layers[n].U.detach().double().square().sum(0) for n in bench.layers}
        curves = [[float(sigma[n][int(r):].square().sum()) for r in measured.ranks[i]]
                  for i, n in enumerate(measured.layer_names)]
    else:
        (match,) = [n for n in VARIANTS if curve_name in n]
        curves = Sensitivity.from_dict(json.loads(variant_file(folder, match).read_text())
                                       ["sensitivity"]).errors
    errors = [_fill_from_curve(list(curves[i]), [int(r) for r in measured.ranks[i]],
                               {**{k: float(measured.errors[i][k]) for k in levels},
                                measured.ranks.shape[1] - 1: 0.0})
              for i in range(len(measured.layer_names))]
    return (f"{curve_name} rescaled to the reference's levels {levels}",
            Sensitivity(list(measured.layer_names), list(measured.shapes),
                        measured.ranks.copy(), np.array(errors)))


def print_table(bench: Bench, results: dict, names: list[str], reference: dict,
                threads: int) -> None:
    rows = []
    for name in names:
        r = results[name]
        delta = [100 * (r["ppl"][b] / reference["ppl"][b] - 1) for b in BUDGETS]
        same = np.mean([np.mean([r["plan"].ranks_for(b)[n] == reference["plan"].ranks_for(b)[n]
                                 for n in bench.layers]) for b in BUDGETS])
        minutes = ("-" if np.isnan(r["seconds"]) else f"{r['seconds'] / 60:.1f}"
                   + ("" if r["whole_run"] else " (resumed)"))
        rows.append([name, minutes,
                     *[f"{r['ppl'][b]:.2f}" for b in BUDGETS], f"{max(delta):+.2f}",
                     f"{same:.2f}"])
    print(format_table(["probe", "minutes", *[f"ppl β {b}" for b in BUDGETS],
                        "worst Δ ppl %", "same rank"], rows,
                       title=f"\nSmolLM2-135M probes, planned at {BUDGETS}, held-out "
                             f"perplexity of {len(bench.held_out)} tokens (no distillation), "
                             f"{threads} threads"))


def _ppl_line(ppl: dict) -> str:
    return " ".join(f"{b}:{p:.2f}" for b, p in ppl.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None,
                        help="variant names (substrings) to run; the reference always is")
    parser.add_argument("--without-reference", action="store_true",
                        help="run only --only's variants (e.g. beside a process probing the "
                             "reference); the comparison table needs the reference's file")
    parser.add_argument("--rescaled", nargs="*", default=[], metavar="CURVE@LEVELS",
                        help="no probe run: CURVE (a variant name substring, or 'tail' for "
                             "each layer's tail energy) rescaled to the reference's measured "
                             "damage at LEVELS, e.g. 'tail@0,14' or '64 draws@0'; what "
                             "measuring those levels on the reference's tokens would give")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    folder = out / "probe-variants"
    folder.mkdir(exist_ok=True)
    bench = load_bench(out, args.eval_tokens)

    names = [n for i, n in enumerate(VARIANTS)
             if (i == 0 and not args.without_reference) or args.only is None
             or any(s in n for s in args.only)]
    results = {}
    for name in names:
        record = run_variant(bench, folder, name, args.threads)
        results[name] = r = bench.evaluate(record, variant_file(folder, name))
        print(f"{name}: {r['seconds'] / 60:.1f} min ({record['threads']} threads, load "
              f"{record['load_average']}); ppl {_ppl_line(r['ppl'])}", flush=True)

    reference_name = list(VARIANTS)[0]
    if reference_name not in results:
        first = folder / "variant-0.json"
        if not first.is_file():
            return  # no reference yet: each variant's figures are printed above
        results[reference_name] = bench.evaluate(json.loads(first.read_text()), first)
        names.insert(0, reference_name)
    for spec in args.rescaled:
        name, sens = rescaled_sensitivity(bench, folder, spec)
        results[name] = bench.evaluate({"seconds": float("nan"), "whole_run": True,
                                        "sensitivity": sens.to_dict()})
        names.append(name)
        print(f"{name}: ppl {_ppl_line(results[name]['ppl'])}", flush=True)
    print_table(bench, results, names, results[reference_name], args.threads)
    (folder / "results.json").write_text(json.dumps(
        {n: {"seconds": r["seconds"], "whole_run": r["whole_run"],
             "ppl": {str(b): p for b, p in r["ppl"].items()}} for n, r in results.items()},
        indent=1))


if __name__ == "__main__":
    main()
