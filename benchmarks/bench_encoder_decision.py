"""`flexrank-export --budget auto` on a distilled all-MiniLM-L6-v2 checkpoint (issue 19): the
decision by measured cosine of the pooled embedding to the original's (an encoder's
quality), at each --quality-tolerance given.

The checkpoint folder (bench_encoder.py's OUT/elastic) is copied to WORK/elastic, and
WORK/stages/calibration.safetensors gets the held-out text as `flexrank compress` keeps it:
16 sequences of 128 tokens of the last 10 % of tinyshakespeare (`calibration_data`, seed
0). flexrank-export measures the quality once (flexrank-quality.json) and prints the table.

    .venv/bin/python benchmarks/bench_encoder_decision.py /tmp/hC/runB/elastic \
        /tmp/flexrank-encoder-decision --profile laptop-x86 --tolerances 0.01,0.05
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from common import SHAKESPEARE
from safetensors.torch import save_file

from flexrank.cli import export_main
from flexrank.compress.calibration import calibration_data
from flexrank.compress.models import load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="an elastic checkpoint folder")
    parser.add_argument("work", type=Path, help="folder made here (replaced if present)")
    parser.add_argument("--profile", default="laptop-x86")
    parser.add_argument("--tolerances", default="0.01,0.05")
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    shutil.copytree(args.checkpoint, args.work / "elastic")
    (args.work / "stages").mkdir()
    model, tokenizer = load_model("all-minilm-l6-v2")
    # model=: windows wrapped in [CLS] … [SEP], as flexrank compress keeps an encoder's
    held = torch.cat([b["input_ids"] for b in calibration_data(
        tokenizer, str(SHAKESPEARE), model=model, num_samples=16, seq_len=128, seed=0,
        span=(0.9, 1.0), held_out=True)])
    save_file({"train": held[:1].clone(), "eval": held},
              str(args.work / "stages" / "calibration.safetensors"))
    for tolerance in args.tolerances.split(","):
        print(f"==== --quality-tolerance {tolerance}")
        export_main([str(args.work / "elastic"), "--profile", args.profile, "--dry-run",
                     "--quality-tolerance", tolerance])


if __name__ == "__main__":
    main()
