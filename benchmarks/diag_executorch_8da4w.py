"""Why an 8da4w `.pte` disagreed with its eager twin (issue 16): SmolLM2-135M's own layers
and activations, eager torchao 8da4w against the XNNPACK program in ExecuTorch's runtime.

    cd benchmarks && ../.venv/bin/python diag_executorch_8da4w.py linears [--scales fp32|bf16]
    cd benchmarks && ../.venv/bin/python diag_executorch_8da4w.py model --layers 2 [--scales ...]
    cd benchmarks && ../.venv/bin/python diag_executorch_8da4w.py random --norms unit|random \
        [--layers 2] [--vocab 49152] [--tokens 32]

`linears`: each listed nn.Linear alone (its real weight, its real input on 48 held-out
tinyshakespeare tokens) quantized int4/group 32 with the scales as torchao computes them
(`fp32`) or rounded to bfloat16 first (`bf16`), exported, run; prints relative ‖Δ‖ of the
program vs the eager quantized layer, and of the eager quantized layer vs float.
`model`: the model truncated to `--layers` decoder layers, every linear quantized (the
exporter's `quantize_8da4w_` for bf16, torchao's default config for fp32), through the
exporter's decoder wrapper and lowering; logits of program vs eager: ‖Δ‖/‖eager‖, top-1.
`random`: the random SmolLM2-shaped model of tests/test_executorch_8da4w.py (8-bit
embedding, all linears 8da4w), RMSNorm weights transformers' ones (`unit`) or random;
prints the eager model against itself with the RMSNorm computed in float64 (how far two
correct float implementations land apart), every linear input element within 1e-4 int8
steps of a rounding boundary (token, distance), then the program vs eager per position.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from bench_int4 import dense_folder, heldout_ids
from torch import nn

LINEARS = ("model.layers.0.self_attn.q_proj,model.layers.1.mlp.down_proj,"
           "model.layers.10.self_attn.o_proj,model.layers.29.mlp.down_proj,lm_head")


def quantize(module: nn.Module, scales: str) -> None:
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    from flexrank.exporters.executorch.quant import quantize_8da4w_

    if scales == "bf16":
        quantize_8da4w_(module, [], 32, embedding_bits=None)
    else:  # the exporter before issue 16: torchao's defaults, float32 scales
        quantize_(module, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
            filter_fn=lambda m, fqn: isinstance(m, nn.Linear))


def relative(a, b, ref) -> float:
    return float((a - b).norm() / ref.norm())


def linears(model, ids, names, scales, folder: Path) -> None:
    from flexrank.exporters.executorch.program import lower_to_pte
    from flexrank.exporters.executorch.validate import load_method

    inputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach())) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    for name in names:
        x, layer = inputs[name], nn.Sequential(copy.deepcopy(model.get_submodule(name)))
        with torch.no_grad():
            exact = layer(x)
            quantize(layer, scales)
            eager = layer(x)
        path = folder / f"{name}.pte"
        lower_to_pte(torch.export.export(layer, (x,), strict=False), path, {})
        got = load_method(path).execute([x])[0]
        print(f"{name:34s} |x| max {x.abs().max():7.3g}  eager-q vs float "
              f"{relative(eager, exact, exact):.3g}  program vs eager-q "
              f"{relative(got, eager, exact):.3g}", flush=True)


def truncated(model, ids, layers, scales, folder: Path) -> None:
    from flexrank.exporters.executorch.program import (
        decoder_metadata,
        decoder_wrapper,
        trace_and_lower,
    )
    from flexrank.exporters.executorch.validate import load_method

    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    quantize(model, scales)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    path = folder / "model.pte"
    trace_and_lower(decoder_wrapper(model, 64), "decoder", ids, 64, 1, path,
                    decoder_metadata(model, 64))
    got = load_method(path).execute([ids, torch.arange(ids.shape[1])])[0]
    top1 = (got.argmax(-1) == eager.argmax(-1)).float().mean().item()
    print(f"{layers} layers, {scales} scales: program vs eager-q ‖Δ‖/‖eager‖ "
          f"{relative(got, eager, eager):.3g}, top-1 {top1:.3f}", flush=True)


def random_model(layers: int, vocab: int, tokens: int, norms: str, folder: Path) -> None:
    import sys

    from transformers.models.llama import modeling_llama

    from flexrank.exporters.executorch.program import (
        decoder_metadata,
        decoder_wrapper,
        trace_and_lower,
    )
    from flexrank.exporters.executorch.quant import quantize_8da4w_
    from flexrank.exporters.executorch.validate import load_method

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_executorch_8da4w import row_tie_distances, smollm2_shaped

    model = smollm2_shaped(layers, vocab, unit_norms=norms == "unit")
    quantize_8da4w_(model, [], 32, embedding_bits=8)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    near = {}

    def record(name, x):
        distance = row_tie_distances(x)
        near[name] = [(t, f"{d:.1e}") for t, d in enumerate(distance.tolist()) if d < 1e-4]

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: record(n, i[0]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    float32_norm = modeling_llama.LlamaRMSNorm.forward

    def float64_norm(self, hidden):
        h = hidden.double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.double() * h).to(hidden.dtype)

    modeling_llama.LlamaRMSNorm.forward = float64_norm
    with torch.no_grad():
        eager64 = model(input_ids=ids).logits
    modeling_llama.LlamaRMSNorm.forward = float32_norm
    print(f"{norms} norms: eager vs eager with a float64 RMSNorm "
          f"{relative(eager64, eager, eager):.3g}", flush=True)
    for name, found in near.items():
        if found:
            print(f"  {name}: {found}")
    path = folder / "model.pte"
    trace_and_lower(decoder_wrapper(model, 64), "decoder", ids, 64, 1, path,
                    decoder_metadata(model, 64), quantized=True)
    got = load_method(path).execute([ids, torch.arange(ids.shape[1])])[0]
    per_position = ((got - eager).norm(dim=-1) / eager.norm(dim=-1))[0]
    print(f"program vs eager {relative(got, eager, eager):.3g}; per position "
          + " ".join(f"{v:.0e}" for v in per_position.tolist()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("linears", "model", "random"))
    parser.add_argument("--scales", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--names", default=LINEARS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--norms", choices=("unit", "random"), default="random")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    if args.mode == "random":
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            random_model(args.layers, args.vocab, args.tokens, args.norms, Path(tmp))
        return
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    folder = dense_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(heldout_ids(folder, 48))[None]
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "linears":
            linears(model, ids, args.names.split(","), args.scales, Path(tmp))
        else:
            truncated(model, ids, args.layers, args.scales, Path(tmp))


if __name__ == "__main__":
    main()
