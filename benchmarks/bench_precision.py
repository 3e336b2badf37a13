"""Host decode and prefill per precision in onnxruntime (issue 17): the float32 graph of a
per-budget bundle, its dynamic int8 (quantize_dynamic, per channel, as exporters/onnx
does) and its 4-bit MatMulNBits (RTN, block 32, symmetric, accuracy level 4), timed in
ONE process with the three sessions' runs interleaved round by round; medians and ratios.

    .venv/bin/python benchmarks/bench_precision.py --bundle dist --out /tmp/h5prec --rounds 5

From the medians it derives what `flexrank.device.predict` needs per precision: the
bandwidth factor relative to fp32's (bytes read per token over decode time beyond the
fixed per-layer cost) and the prefill speed-up (the compute factor's ratio).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import onnx
from tqdm import tqdm

LAYERS = 30  # SmolLM2-135M
OVERHEAD_S = 50e-6  # per layer and forward: flexrank.device.predict's default


def make_variants(bundle: Path, out: Path, beta_folder: str) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    variants = {}
    for name in ("fp32", "int8", "int4"):
        folder = out / name
        if not folder.exists():
            shutil.copytree(bundle, folder, ignore=shutil.ignore_patterns("bench"))
            graph = folder / beta_folder / "model.onnx"
            if name == "int8":
                tmp = graph.with_name("int8.onnx")
                quantize_dynamic(graph, tmp, op_types_to_quantize=["MatMul"], per_channel=True,
                                 weight_type=QuantType.QInt8,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
                tmp.replace(graph)
            elif name == "int4":
                model = onnx.load(str(graph))
                config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True,
                                                      accuracy_level=4)
                quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True,
                                                 accuracy_level=4, algo_config=config)
                quantizer.process()
                onnx.save(quantizer.model.model, str(graph))
        variants[name] = folder
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="dist", help="a per-budget fp32 ONNX bundle")
    p.add_argument("--budget-folder", default="budget-1")
    p.add_argument("--out", default="/tmp/flexrank-bench-precision")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from flexrank.runtime.session import ElasticSession

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = make_variants(Path(args.bundle), out, args.budget_folder)
    sizes = {k: (v / args.budget_folder / "model.onnx").stat().st_size for k, v in
             variants.items()}
    sessions = {k: ElasticSession(v, threads=args.threads, verify=False)
                for k, v in variants.items()}
    decode = {k: [] for k in sessions}
    ttft = {k: [] for k in sessions}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, session in sessions.items():  # interleaved: one of each per round
            figures = session.measure(args.prompt, args.tokens)
            decode[name].append(figures["decode_ms_median"])
            ttft[name].append(figures["ttft_s"])
    fixed = LAYERS * OVERHEAD_S * 1e3
    med = {k: statistics.median(v) for k, v in decode.items()}
    pre = {k: statistics.median(v) for k, v in ttft.items()}
    print(f"| precision | file MB | decode ms/token (median of {args.rounds}) | vs fp32 | "
          f"TTFT s ({args.prompt} tokens) | vs fp32 | bandwidth factor vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name in sessions:
        bw = (sizes[name] / sizes["fp32"]) * (med["fp32"] - fixed) / (med[name] - fixed)
        print(f"| {name} | {sizes[name] / 1e6:.1f} | {med[name]:.2f} | "
              f"{med[name] / med['fp32']:.2f} | {pre[name]:.3f} | {pre[name] / pre['fp32']:.2f} "
              f"| {bw:.3f} |")


if __name__ == "__main__":
    main()
