"""flexrank-export's int4 knobs (--int4-algo, --block-size, --embedding-bits) reach the
ONNX exporter: the bundle's graph holds MatMulNBits blocks of that size from that
algorithm and the tied table in those bits, as its manifest says."""

from __future__ import annotations

import json

import onnx

from flexrank.cli import export_main
from flexrank.manifest import MANIFEST_FILE


def test_int4_options_reach_the_graph(checkpoint, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert export_main([str(checkpoint), "--budget", "0.8", "--quantize", "int4",
                        "--int4-algo", "hqq", "--block-size", "16", "--embedding-bits", "8",
                        "-o", str(out)]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    entry = next(e for e in manifest["budgets"] if e["beta"] == 0.8)
    record = entry["quantization"]
    assert (record["algorithm"], record["block_size"], record["embedding_bits"]) == ("hqq", 16, 8)
    graph = onnx.load(str(out / entry["graph"])).graph
    nbits = {n.output[0]: {a.name: a.i for a in n.attribute} for n in graph.node
             if n.op_type == "MatMulNBits"}
    assert {a["block_size"] for a in nbits.values()} == {16}
    assert nbits["logits"]["bits"] == 8
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 1
    # HQQ's float zero points on the layers (RTN's uint8 ones on the table)
    inits = {i.name: i.data_type for i in graph.initializer}
    layer = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] != "logits")
    assert inits[layer.input[3]] == onnx.TensorProto.FLOAT
