"""Issue 15: where an int4 SmolLM2-135M bundle's bytes go, with the tied embedding/lm_head
table in 4, 8 or 32 bits (stored once in each case).

    .venv/bin/python benchmarks/bench_int4_bytes.py --out /tmp/flexrank-int4-bytes \
        [--budgets 1,0.6] [--embedding-bits 4,8,32]

A DataSVD-only factorisation (64 windows of 64 tokens of tinyshakespeare, no
distillation) exported per budget in int4 (RTN, blocks of 32, accuracy level 4) through
`flexrank.exporters.export`, without validation (tests/test_int4.py checks the graphs).
Prints, per (table bits, β): the graph file's MB and its bytes split by the op that
reads each initializer (MatMulNBits, GatherBlockQuantized's table, float Gather, other).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import SHAKESPEARE  # noqa: E402


def bytes_by_op(path: Path) -> Counter:
    graph = onnx.load(str(path)).graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, node.op_type)
    by_op = Counter()
    for init in graph.initializer:
        size = len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
        by_op[readers.get(init.name, "unread")] += size
    return by_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", default="1,0.6")
    parser.add_argument("--embedding-bits", default="4,8,32")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)  # OpenMP threads busy-wait on a shared 2-core host
    from elastic_fixtures import nested_plan

    import flexrank
    from flexrank.compress.calibration import calibration_data
    from flexrank.compress.covariance import collect_covariances
    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.surgery import factorize_
    from flexrank.exporters import export
    from flexrank.exporters.onnx.convert import OnnxExportConfig

    budgets = [float(b) for b in args.budgets.split(",")]
    model, tokenizer = flexrank.load_model("smollm2-135m")
    batches = calibration_data(tokenizer, str(SHAKESPEARE), num_samples=64, seq_len=64,
                               batch_size=16)
    factorize_(model, collect_covariances(model, batches, progress=False), progress=False)
    elastic = ElasticModel(model, nested_plan(model, tuple(sorted(budgets))),
                           tokenizer=tokenizer, model_id="smollm2-135m-datasvd")
    for bits in (int(b) for b in args.embedding_bits.split(",")):
        config = OnnxExportConfig(validate=False, int4_embedding_bits=bits)
        out = args.out / f"table{bits}"
        manifest = export(elastic, out, budgets=budgets, quantize="int4", config=config)
        for entry in manifest["budgets"]:
            graph = out / entry["graph"]
            split = {op: round(size / 1e6, 2) for op, size in bytes_by_op(graph).most_common()}
            print(f"table {bits:2d} bits, β {entry['beta']:g}: graph "
                  f"{graph.stat().st_size / 1e6:.2f} MB, forms {entry['forms']}, by op {split}",
                  flush=True)


if __name__ == "__main__":
    main()
