"""Where the time of an ExecuTorch export of a SmolLM2-shaped decoder goes (issues 16, 17):
torch.export, then `to_edge_transform_and_lower` with the XNNPACK partitioner, for a random
Llama with SmolLM2-135M's widths and a given number of layers, in 8da4w (the exporter's
own quantizer) or float32, the sequence axis dynamic (as the exporter exports) or static.

    .venv/bin/python benchmarks/diag_executorch_lowering.py LAYERS {8da4w,float} [--static]

Prints the seconds of each phase, the number of XNNPACK partitions (delegate calls) and
the ops left outside them.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexrank.exporters.executorch.program import decoder_wrapper
from flexrank.exporters.executorch.quant import quantize_8da4w_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("layers", type=int)
    parser.add_argument("precision", choices=("8da4w", "float"))
    parser.add_argument("--static", action="store_true", help="one token, no dynamic axis")
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=args.layers, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    if args.precision == "8da4w":
        quantize_8da4w_(model, [], 32, 8)
    module = decoder_wrapper(model, 256)
    length = 1 if args.static else 8
    inputs = {"input_ids": torch.ones(1, length, dtype=torch.long),
              "cache_position": torch.arange(length)}
    seq = torch.export.Dim("seq", min=1, max=255)
    shapes = None if args.static else {"input_ids": {1: seq}, "cache_position": {0: seq}}
    started = time.perf_counter()
    program = torch.export.export(module, (), inputs, strict=True, dynamic_shapes=shapes)
    exported = time.perf_counter() - started
    started = time.perf_counter()
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    lowered = time.perf_counter() - started
    ops = collections.Counter(str(n.target).split(">")[0].removeprefix("<EdgeOpOverload: ")
                              for n in edge.exported_program().graph.nodes
                              if n.op == "call_function")
    print(f"{args.layers} layers {args.precision}{' static' if args.static else ''}: "
          f"torch.export {exported:.1f} s, to_edge_transform_and_lower {lowered:.1f} s, "
          f"{ops.pop('executorch_call_delegate', 0)} XNNPACK partitions")
    for op, count in ops.most_common(12):
        print(f"  {count:4d}  {op}")


if __name__ == "__main__":
    main()
