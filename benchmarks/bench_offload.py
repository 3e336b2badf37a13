"""Issue 20 benchmark: peak RSS of block-sequential covariance + DataSVD with the
calibration hidden states in memory against on disk (`factorize_blockwise_(offload_dir=)`).

    .venv/bin/python benchmarks/bench_offload.py [--before 83501ef]

Runs the two in two child processes, one after the other (in memory first, then on disk;
`--rounds 2` alternates them twice), each on one thread: a randomly initialised Llama with
SmolLM2-135M's widths (hidden 576, MLP 1536, 9/3 heads, vocabulary 49,152) and `--blocks`
blocks in float32, `--samples` x `--seq-len` random tokens in batches of `--batch`. Each
child reports its RSS before the call (weights, token ids), the peak during it (sampled
every 20 ms, benchmarks.common.PeakRSS) and its lifetime maximum (getrusage ru_maxrss).
The factors of the runs are compared bit for bit (a hash of every U and V). `--before REV`
adds a first run of `factorize_blockwise_` as it was at git revision REV (in memory).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import PeakRSS
from transformers import LlamaConfig, LlamaForCausalLM

from flexrank.compress.blockwise import factorize_blockwise_
from flexrank.compress.select import nested_layers
from flexrank.table import format_table


def child(args) -> dict:
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=49_152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=args.blocks, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=max(2048, args.seq_len))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + args.batch],
                "attention_mask": torch.ones_like(ids[i:i + args.batch])}
               for i in range(0, args.samples, args.batch)]
    factorize = _blockwise_at(args.before) if args.child == "before" else factorize_blockwise_
    with PeakRSS() as before:
        pass
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as folder, PeakRSS() as rss:
        start = time.perf_counter()
        factorize(model, batches, progress=False,
                  **({"offload_dir": folder} if args.child == "disk" else {}))
        seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name, layer in nested_layers(model).items():
        digest.update(name.encode())
        digest.update(layer.U.detach().numpy().tobytes())
        digest.update(layer.V.detach().numpy().tobytes())
    hidden = args.samples * args.seq_len * config.hidden_size * 4
    where = args.child if args.child != "before" else f"memory at {args.before}"
    return {"where": where, "before": before.peak, "peak": rss.peak,
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": seconds, "hidden": hidden, "factors": digest.hexdigest()[:16]}


def _blockwise_at(rev: str):
    """factorize_blockwise_ as flexrank/compress/blockwise.py was at git revision `rev`."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:flexrank/compress/blockwise.py"],
                            cwd=root, check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as folder:
        path = Path(folder) / "blockwise_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("blockwise_before", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module.factorize_blockwise_


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before", default=None,
                        help="also run factorize_blockwise_ of this git revision, in memory")
    parser.add_argument("--child", choices=("before", "memory", "disk"), default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = []
    order = ("before", "memory", "disk") if args.before else ("memory", "disk")
    for _ in range(args.rounds):
        for where in order:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", where],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    rows = [[r["where"], r["before"] / 1e6, r["peak"] / 1e6, (r["peak"] - r["before"]) / 1e6,
             r["maxrss"] / 1e6, f"{r['seconds']:.0f}", r["factors"]] for r in results]
    hidden = results[0]["hidden"] / 1e6
    print(format_table(
        ["hidden states", "RSS before (MB)", "peak RSS (MB)", "peak - before (MB)",
         "ru_maxrss (MB)", "s", "factors (sha256)"], rows,
        title=f"\n{args.blocks} blocks of SmolLM2-135M's widths, float32, {args.samples} x "
              f"{args.seq_len} tokens in batches of {args.batch}: one copy of the hidden "
              f"states is {hidden:.0f} MB, one batch's "
              f"{hidden * args.batch / args.samples:.1f} MB"))
    assert len({r["factors"] for r in results}) == 1, "the factors differ"


if __name__ == "__main__":
    main()
