"""Depth axis (issue 18): rank-only vs depth-only vs the joint plan, all distilled with the
same settings, side by side: held-out perplexity and KL, parameters kept and onnxruntime
decode ms/token at each budget.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_depth.py STAGES_DIR \\
        [--budgets 0.6,0.5,0.4] [--steps 20] [--adapter-ranks 8,16,32,64] \\
        [--max-replaced 0.5] [--text-windows 16] [--decode-tokens 30] [--out DIR]
    .venv/bin/python benchmarks/bench_depth.py --smoke      # a tiny random Llama, seconds

STAGES_DIR is a compress work folder (`flexrank compress -o DIR`, or a `flexrank-export`
cache folder under ~/.cache/flexrank/compress/), read only: its calibration ids, DataSVD
factors, rank sensitivity and (when saved) covariances, so that the three variants start
from the same factors and differ only in their plan:

- rank-only: `flexrank.planning.planner.plan` on the rank sensitivity;
- depth-only: `joint_plan` with every layer at full rank (blocks replaced or kept whole;
  budgets below what replacing every candidate reaches are reported as unreachable);
- joint: `joint_plan` on both.

The depth probe runs on the rank probe's batches (`probe_samples` sequences) and is cached
in OUT/depth-probe.json. Each variant is distilled with the folder's DistillConfig and
`--steps` (same for all), evaluated on the last 10 % of tinyshakespeare, and exported per
budget (ONNX, per-budget layout); decode times of one budget's three graphs are taken in
one process with their steps interleaved (bench_onnx.time_in_pair): medians, and ratios to
rank-only.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import HELDOUT_SPAN, SHAKESPEARE

from flexrank.compress.calibration import calibration_data, model_batches, to_batches
from flexrank.compress.covariance import CovarianceStats, collect_covariances
from flexrank.compress.depth import DepthConfig, make_depth_elastic_, probe_depth
from flexrank.compress.distill import distill, evaluate_budgets
from flexrank.compress.elastic import ElasticModel
from flexrank.io import write_json_atomic
from flexrank.planning.depth import joint_plan
from flexrank.planning.planner import plan as rank_plan
from flexrank.planning.sensitivity import Sensitivity
from flexrank.table import format_table

VARIANTS = ("rank-only", "depth-only", "joint")


def full_rank_only(sens: Sensitivity) -> Sensitivity:
    """Every layer's only choice is its full rank (error 0): the depth-only plan."""
    return Sensitivity(list(sens.layer_names), list(sens.shapes), sens.ranks[:, -1:],
                       np.zeros((sens.num_layers, 1)), dict(sens.meta))


def make_plans(sens, depth, budgets: list[float]) -> dict:
    """{variant: (plan, its budgets)}; a budget a variant cannot reach is left out."""
    plans = {"rank-only": rank_plan(sens, budgets=budgets)}
    for name, rank_sens in (("depth-only", full_rank_only(sens)), ("joint", sens)):
        reachable = list(budgets)
        while reachable:
            try:
                plans[name] = joint_plan(rank_sens, depth, budgets=reachable)
                break
            except ValueError as err:
                if "below the smallest reachable" not in str(err):
                    raise
                reachable = reachable[1:]  # ascending: drop the smallest
    return plans


def load_folder(folder: Path, model_spec: str):
    """teacher, tokenizer, student (DataSVD), rank sensitivity, covariances or None,
    train / probe batches, DistillConfig."""
    from bench_distill_defaults import load_stages

    teacher, tokenizer, student, _, ids, config = load_stages(folder, model_spec)
    stages = folder / "stages"
    sens = Sensitivity.load(stages / "sensitivity.json")
    stats = None
    if (stages / "covariance.safetensors").is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(stages / "covariance.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
        stats = CovarianceStats(load_file(str(stages / "covariance.safetensors")),
                                meta["counts"], meta["leader_of"])
    else:
        logging.warning("%s has no saved covariances: adapters use plain SVD", stages)
    train = to_batches(ids["train"], config.batch_size)
    probe_batches = model_batches(ids["train"][:config.probe_samples], config.batch_size,
                                  teacher)
    return teacher, tokenizer, student, sens, stats, train, probe_batches, config.distill


def smoke_setup():
    """A tiny random 4-block Llama, factorised and probed, in the same shapes as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexrank.compress.config import DistillConfig, ProbeConfig
    from flexrank.compress.probe import probe
    from flexrank.compress.surgery import factorize_

    torch.manual_seed(0)
    # SmolLM2's vocabulary: bench_onnx's decoder prompts with ids up to 40000
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         initializer_range=0.2)
    teacher = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 49152, (48, 16), generator=generator)
    train = to_batches(ids, 8)
    student = copy.deepcopy(teacher)
    stats = collect_covariances(student, train, progress=False)
    factorize_(student, stats, progress=False)
    sens = probe(student, teacher, train[:1], ProbeConfig(mode="exact", num_levels=4, top_k=0),
                 progress=False)
    return (teacher, None, student, sens, stats, train, train[:1],
            DistillConfig(steps=2, batch_size=8, lr=1e-3, checkpoint_every=0))


def export_variant(name, elastic, budgets, out: Path) -> dict[float, Path]:
    from flexrank.exporters import export

    manifest = export(elastic, out / name, layout="per-budget", budgets=budgets)
    return {entry["beta"]: out / name / entry["graph"] for entry in manifest["budgets"]}


def decode_times(graphs: dict[str, Path], decode_tokens: int, threads: int) -> dict:
    """{variant: median decode s/token}, the variants' steps interleaved in one process."""
    from bench_onnx import time_in_pair, timing_process

    names = list(graphs)
    with timing_process(threads) as pool:
        timed = pool.submit(time_in_pair, [(graphs[n], None) for n in names],
                            decode_tokens).result()
    return {n: t[1] for n, t in zip(names, timed, strict=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stages", type=Path, nargs="?")
    parser.add_argument("--model", default="")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, no folder")
    parser.add_argument("--budgets", default="0.6,0.5,0.4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--adapter-ranks", default="8,16,32,64")
    parser.add_argument("--max-replaced", type=float, default=0.5)
    parser.add_argument("--donor-window", type=int, default=4,
                        help="DepthConfig.donor_window: donors tried per candidate block")
    parser.add_argument("--text-windows", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-export", action="store_true", help="quality only")
    parser.add_argument("--plan-only", action="store_true",
                        help="depth probe and plans only: predicted errors, no training")
    parser.add_argument("--out", type=Path, default=Path("bench-depth"))
    args = parser.parse_args()
    if args.smoke == (args.stages is not None):
        parser.error("give STAGES_DIR or --smoke (not both)")
    args.out.mkdir(parents=True, exist_ok=True)
    budgets = sorted({float(b) for b in args.budgets.split(",")} | {1.0})
    adapter_ranks = tuple(int(a) for a in args.adapter_ranks.split(","))
    if args.smoke:
        teacher, tokenizer, student, sens, stats, train, probe_batches, distill_config = \
            smoke_setup()
        adapter_ranks = tuple(a for a in adapter_ranks if a <= 32) or (4, 8)
        held_out = train[-2:]
    else:
        teacher, tokenizer, student, sens, stats, train, probe_batches, distill_config = \
            load_folder(args.stages, args.model)
        distill_config = type(distill_config).from_dict(
            {**distill_config.to_dict(), "steps": args.steps, "checkpoint_every": 0})
        held_out = calibration_data(tokenizer, str(SHAKESPEARE), num_samples=args.text_windows,
                                    seq_len=train[0]["input_ids"].shape[1],
                                    span=HELDOUT_SPAN, batch_size=8)
    report = {"budgets": budgets, "distill": distill_config.to_dict(), "variants": {}}
    started = time.perf_counter()
    depth = probe_depth(student, probe_batches, stats,
                        DepthConfig(max_replaced=args.max_replaced,
                                    adapter_ranks=adapter_ranks,
                                    donor_window=args.donor_window),
                        cache_path=args.out / "depth-probe.json")
    report["depth_probe_s"] = time.perf_counter() - started
    report["depth"] = depth.to_dict()
    plans = make_plans(sens, depth, budgets)
    if args.plan_only:
        report["plans"] = {name: p.to_dict() for name, p in plans.items()}
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        print(depth_table(depth))
        print(plan_table(plans, budgets))
        return 0
    graphs: dict[float, dict[str, Path]] = {}
    for name in VARIANTS:
        if name not in plans:
            report["variants"][name] = {"unreachable": True}
            continue
        plan = plans[name]
        saved = args.out / "checkpoints" / name  # a rerun reuses a variant distilled before
        settings = {"stages": str(args.stages), "smoke": args.smoke, "steps": args.steps,
                    "budgets": budgets, "adapter_ranks": list(adapter_ranks),
                    "max_replaced": args.max_replaced, "donor_window": args.donor_window}
        record = saved / "distill.json"
        if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
            elastic = ElasticModel.from_pretrained(saved, model=copy.deepcopy(teacher))
            elastic.tokenizer = tokenizer
            seconds = json.loads(record.read_text())["distill_s"]
        else:
            model = copy.deepcopy(student)
            if hasattr(plan, "adapter_ranks"):
                make_depth_elastic_(model, plan, stats)
            started = time.perf_counter()
            distill(model, teacher, plan, train, distill_config, progress=not args.smoke)
            seconds = time.perf_counter() - started
            elastic = ElasticModel(model, plan, tokenizer=tokenizer, model_id=name)
            elastic.save_pretrained(saved)
            write_json_atomic(record, {"distill_s": seconds, "settings": settings})
        quality = evaluate_budgets(elastic, teacher, held_out)
        report["variants"][name] = {
            "distill_s": seconds, "plan": plan.to_dict(),
            "kept": dict(zip(map(str, plan.budgets), plan.kept_fraction, strict=True)),
            "params": dict(zip(map(str, plan.budgets), plan.params, strict=True)),
            "quality": {str(b): v for b, v in quality.items()}}
        if not args.no_export:
            compared = [b for b in plan.budgets if b < 1]  # β = 1 is the same model in all three
            for beta, path in export_variant(name, elastic, compared, args.out).items():
                graphs.setdefault(beta, {})[name] = path
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"{name}: distilled in {seconds:.0f} s", file=sys.stderr)
    for beta, per_variant in sorted(graphs.items()):
        for name, seconds in decode_times(per_variant, args.decode_tokens,
                                          args.threads).items():
            report["variants"][name].setdefault("decode_s", {})[str(beta)] = seconds
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(table(report))
    return 0


def depth_table(depth) -> str:
    """Per block: cosine score, KL when dropped, and for candidates the donor and the KL of
    the stand-in at each adapter rank."""
    rows = []
    for j, name in enumerate(depth.blocks):
        row = [name, f"{depth.cosine[j]:.4f}", f"{depth.skip_kl[j]:.4g}"]
        if j in depth.candidates:
            c = depth.candidates.index(j)
            row += [depth.blocks[depth.donors[c]].rsplit(".", 1)[-1],
                    *[f"{e:.4g}" for e in depth.errors[c]]]
        else:
            row += [""] * (1 + len(depth.adapter_ranks))
        rows.append(row)
    return format_table(["block", "1 - cos", "KL dropped", "donor",
                         *[f"KL a={a}" for a in depth.adapter_ranks]], rows)


def plan_table(plans: dict, budgets) -> str:
    """Per budget and variant: the planned (predicted) error, params, replaced blocks."""
    rows = []
    for beta in budgets:
        for name in VARIANTS:
            plan = plans.get(name)
            if plan is None or not any(abs(b - beta) < 1e-9 for b in plan.budgets):
                rows.append([f"{beta:g}", name, "unreachable", "", "", "", ""])
                continue
            b = plan.budget_index(beta)
            replaced = plan.replaced_for(beta) if hasattr(plan, "replaced_for") else {}
            read = plan.read_params[b] if hasattr(plan, "read_params") else plan.params[b]
            rows.append([f"{beta:g}", name, f"{plan.predicted_error[b]:.4g}",
                         f"{plan.dp_error[b]:.4g}", f"{plan.params[b]:,}", f"{read:,}",
                         " ".join(f"{k.rsplit('.', 1)[-1]}<{v[0].rsplit('.', 1)[-1]}@{v[1]}"
                                  for k, v in replaced.items()) or "-"])
    return format_table(["β", "variant", "pred. error", "DP optimum", "params",
                         "read/token", "replaced (block<donor@rank)"], rows)


def table(report: dict) -> str:
    rows = []
    for beta in report["budgets"]:
        reference = report["variants"].get("rank-only", {}).get("decode_s", {}).get(str(beta))
        for name in VARIANTS:
            entry = report["variants"].get(name, {})
            quality = entry.get("quality", {}).get(str(beta))
            if quality is None:
                rows.append([f"{beta:g}", name, "unreachable", "", "", "", ""])
                continue
            decode = entry.get("decode_s", {}).get(str(beta))
            rows.append([f"{beta:g}", name, f"{quality['ppl']:.4g}", f"{quality['kl']:.3g}",
                         f"{entry['params'][str(beta)]:,}",
                         f"{decode * 1e3:.2f}" if decode else "-",
                         f"{decode / reference:.3f}" if decode and reference else "-"])
    return format_table(["β", "variant", "ppl", "KL", "params", "decode ms/token",
                         "vs rank-only"], rows)


if __name__ == "__main__":
    sys.exit(main())
