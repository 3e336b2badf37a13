"""Issue 20 benchmark: peak RSS and wall time of block-sequential covariance + DataSVD on
randomly initialised Llama models with real shapes, weights in bf16.

    .venv/bin/python benchmarks/bench_scale.py --shapes llama-3.2-1b [--blocks 1]
    .venv/bin/python benchmarks/bench_scale.py --shapes llama-3-8b --depth 1
    .venv/bin/python benchmarks/bench_scale.py --shapes llama-3.2-3b --blocks 1

The whole model (every block, the 128,256-token embedding) is built in bf16, so the
measured RSS holds the real weights; `--blocks K` calibrates and factorises only the
first K blocks (a filter on the target layers; the other blocks still run, dense), and
`--depth D` builds D blocks instead of the real number. Extrapolation, stated in the
output: total time = measured seconds per factorised block × blocks (every block has the
same shapes, and the eigendecompositions and SVDs, which dominate, do not depend on the
data); peak RSS of the full run = measured peak + the growth of the weights of the blocks
not factorised here (a full-rank factor pair U (m, R), V (n, R) replaces a (m, n) weight;
R = min(m, n)), computed from the shapes. Few calibration tokens (default 2 × 128): the
time of the maths does not depend on them, and the hidden states they need are stated.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from common import PeakRSS

from flexrank.compress.blockwise import factorize_blockwise_
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.select import find_targets
from flexrank.compress.surgery import factorize_
from flexrank.table import format_table

SHAPES = {  # config.json of each model (hidden, intermediate, layers, heads, kv heads)
    "llama-3.2-1b": (2048, 8192, 16, 32, 8),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8),
    "llama-3-8b": (4096, 14336, 32, 32, 8),
    "smollm2-135m": (576, 1536, 30, 9, 3),  # vocabulary 49,152, tied
    "tiny": (256, 512, 4, 4, 2),  # a smoke test of this script
}
VOCABS = {"smollm2-135m": 49_152}


def build(shapes: str, depth: int | None, dtype: torch.dtype = torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shapes]
    config = LlamaConfig(vocab_size=VOCABS.get(shapes, 128_256), hidden_size=hidden,
                         intermediate_size=inter,
                         num_hidden_layers=depth or layers, num_attention_heads=heads,
                         num_key_value_heads=kv, tie_word_embeddings=shapes != "llama-3-8b",
                         max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    return model, layers


def factor_growth(model, names) -> int:
    """Bytes added when the named layers become full-rank factor pairs."""
    total = 0
    for name in names:
        m, n = model.get_submodule(name).weight.shape
        r = min(m, n)
        total += (m * r + n * r - m * n) * model.get_submodule(name).weight.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--blocks", type=int, default=None, help="factorise the first K")
    parser.add_argument("--depth", type=int, default=None, help="build D blocks")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--all-at-once", action="store_true",
                        help="the previous path: collect_covariances of every layer, then "
                             "factorize_ (for a before/after on the same shapes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with PeakRSS() as rss_build:
        start = time.perf_counter()
        model, real_depth = build(args.shapes, args.depth, getattr(torch, args.dtype))
        build_s = time.perf_counter() - start
    depth = len(model.model.layers)
    blocks = min(args.blocks or depth, depth)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    keep = re.compile(rf"model\.layers\.({'|'.join(map(str, range(blocks)))})\.")
    # names only: a dict of the modules would keep every dense layer alive beside its factors
    targets = set(find_targets(model, lambda name, module: bool(keep.match(name))))
    rest = [n for n in find_targets(model) if n not in targets]
    dense_block = _block_bytes(model)
    growth = factor_growth(model, rest)
    per_block_growth = factor_growth(model, targets) / blocks
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])}
               for i in range(args.samples)]
    with PeakRSS() as rss:
        start = time.perf_counter()
        only = lambda name, module: name in targets  # noqa: E731
        if args.all_at_once:
            factorize_(model, collect_covariances(model, batches, only), filter_fn=only)
        else:
            factorize_blockwise_(model, batches, filter_fn=only, progress=True)
        seconds = time.perf_counter() - start
    per_block = seconds / blocks
    missing_blocks = real_depth - depth  # blocks --depth did not build
    full_peak = rss.peak + growth + missing_blocks * (dense_block + per_block_growth)
    full_model_bytes = model_bytes + missing_blocks * dense_block
    hidden_bytes = args.samples * args.seq_len * model.config.hidden_size * \
        torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows = [
        [f"model ({args.dtype}), as built", f"{depth} of {real_depth} blocks", model_bytes / 1e9],
        ["build, peak RSS", f"{build_s:.0f} s", rss_build.peak / 1e9],
        [f"covariance + DataSVD of {blocks} block(s), peak RSS", f"{seconds:.0f} s",
         rss.peak / 1e9],
        ["  per block", f"{per_block:.0f} s", ""],
        [f"calibration hidden states ({args.dtype})", f"{args.samples} x {args.seq_len} tokens",
         hidden_bytes / 1e9],
        [f"extrapolated: all {real_depth} blocks", f"{per_block * real_depth / 60:.0f} min",
         full_peak / 1e9],
        ["extrapolated peak / model", "", full_peak / full_model_bytes],
    ]
    print(format_table(["", "time", "GB"], rows,
                       title=f"\n{args.shapes} shapes, random weights in {args.dtype}, "
                             f"{'all at once' if args.all_at_once else 'block by block'}, "
                             f"{args.threads} threads"))


def _block_bytes(model) -> int:
    """Bytes of one (dense) block's parameters."""
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


if __name__ == "__main__":
    main()
