"""Distillation settings for the demo's fast compress (issue 17): what each costs and what
each budget ends at, from one set of cached compress stages (calibration, DataSVD factors,
plan), so that only distillation differs between variants.

    .venv/bin/python benchmarks/bench_distill_defaults.py STAGES_DIR \
        [--variants base,anchor,anchor-lr1e-4] [--steps 20] [--text-windows 16] [--out F]

STAGES_DIR is a compress work folder (`flexrank compress -o DIR` or a `flexrank-export`
cache folder under ~/.cache/flexrank/compress/): read only. Every variant starts from the
same DataSVD factors; the full budget is anchored (DistillConfig.full_budget) after
training in "anchor" variants. Each is evaluated on the folder's own held-out sequences
(the figures `flexrank compress` prints) and on the last 10 % of tinyshakespeare.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from common import HELDOUT_SPAN, SHAKESPEARE
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import load_model as load_safetensors_model

import flexrank.compress.distill as distill_module
from flexrank.compress.calibration import calibration_data, to_batches
from flexrank.compress.config import CompressConfig
from flexrank.compress.elastic import ElasticModel, restructure_
from flexrank.compress.models import load_model
from flexrank.planning.planner import NestedPlan
from flexrank.table import format_table

# name -> changes to the folder's DistillConfig
VARIANTS = {
    "base": {"full_budget": "train"},  # what the folder's settings did before issue 17
    "anchor": {},
    "anchor-lr1e-4": {"lr": 1e-4},
    "anchor-lr1e-4-40": {"lr": 1e-4, "steps": 40},
    "anchor-lr3e-4": {"lr": 3e-4},
    "anchor-T2": {"temperature": 2.0},
}


def load_stages(folder: Path, model_spec: str):
    state = json.loads((folder / "flexrank-compress.json").read_text())
    signature = dict(state["signature"])
    model_spec = model_spec or signature.pop("model")
    signature.pop("model", None)
    teacher, tokenizer = load_model(model_spec)
    teacher.requires_grad_(False)
    stages = folder / "stages"
    ids = load_file(str(stages / "calibration.safetensors"))
    student = copy.deepcopy(teacher)
    with safe_open(str(stages / "decomposed.safetensors"), framework="pt") as f:
        specs = json.loads(f.metadata()["json"])
    restructure_(student, specs)
    load_safetensors_model(student, str(stages / "decomposed.safetensors"), strict=False)
    plan = NestedPlan.load(stages / "plan.json")
    config = CompressConfig.from_dict({"type": "CompressConfig", **signature})
    return teacher, tokenizer, student, plan, ids, config


def evaluate(student, teacher, plan, batches) -> dict:
    results = distill_module.evaluate_budgets(ElasticModel(student, plan), teacher, batches)
    return {str(b): v for b, v in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stages", type=Path)
    parser.add_argument("--model", default="")
    parser.add_argument("--variants", default="base,anchor,anchor-lr1e-4")
    parser.add_argument("--steps", type=int, default=20, help="the folder's signature does "
                        "not hold the step count; 20 is fast_compress_config's")
    parser.add_argument("--text-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("distill-defaults.json"))
    args = parser.parse_args()
    teacher, tokenizer, initial, plan, ids, config = load_stages(args.stages, args.model)
    train = to_batches(ids["train"], config.batch_size)
    own = to_batches(ids["eval"], config.batch_size)
    text = calibration_data(tokenizer, str(SHAKESPEARE), num_samples=args.text_windows,
                            seq_len=config.seq_len, span=HELDOUT_SPAN, batch_size=8)
    report = {"stages": str(args.stages), "distill": config.distill.to_dict(), "variants": {}}
    report["before"] = {"own": evaluate(initial, teacher, plan, own),
                        "text": evaluate(initial, teacher, plan, text)}
    for name in args.variants.split(","):
        settings = {**config.distill.to_dict(), "steps": args.steps, "checkpoint_every": 0,
                    **VARIANTS[name]}
        distill_config = type(config.distill).from_dict(settings)
        student = copy.deepcopy(initial)
        started = time.perf_counter()
        result = distill_module.distill(student, teacher, plan, train, distill_config)
        seconds = time.perf_counter() - started
        anchor = result.anchor
        report["variants"][name] = {
            "settings": VARIANTS[name], "seconds": seconds,
            "anchor_worst": anchor.worst_after if anchor else None,
            "own": evaluate(student, teacher, plan, own),
            "text": evaluate(student, teacher, plan, text)}
        print(f"{name}: {seconds:.0f} s", file=sys.stderr)
        args.out.write_text(json.dumps(report, indent=1))
        del student
    print(table(report))
    return 0


def table(report: dict) -> str:
    rows = []
    budgets = sorted(report["before"]["own"], key=float)
    for name, entry in [("DataSVD + plan", report["before"]), *report["variants"].items()]:
        row = [name, f"{entry.get('seconds', 0):.0f}"]
        for b in budgets:
            row += [f"{entry['own'][b]['kl']:.3g}", f"{entry['own'][b]['ppl']:.4g}",
                    f"{entry['text'][b]['ppl']:.4g}"]
        rows.append(row)
    headers = ["variant", "distill s"]
    for b in budgets:
        headers += [f"β{b} KL", f"β{b} ppl", f"β{b} text ppl"]
    return format_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())
