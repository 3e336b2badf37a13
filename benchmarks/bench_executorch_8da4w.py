"""Issue 16: FlexRank's 8da4w `.pte` budgets against ExecuTorch's own LLM export of
SmolLM2-135M in 8da4w, both run by ExecuTorch 1.5's runtime (XNNPACK) in one process.

    cd benchmarks   # `all` runs the three stages in turn; each is cached in OUT
    flock /tmp/heavy.lock ../.venv/bin/python bench_executorch_8da4w.py peer --out OUT
    flock /tmp/heavy.lock ../.venv/bin/python bench_executorch_8da4w.py ours --out OUT \
        --checkpoint ours=~/.cache/flexrank/bench-int4/elastic-b05 --budgets 1,0.5
    flock /tmp/heavy.lock ../.venv/bin/python bench_executorch_8da4w.py measure --out OUT \
        [--threads 2] [--rounds 5] [--steps 32] [--eval-tokens 1024] [--window 256]

1. `peer`: ExecuTorch's own export path, `python -m
   executorch.examples.models.llama.export_llama` from the installed executorch wheel
   (its `smollm2` model class, Meta-format checkpoint + params.json as its
   examples/models/smollm2 ships them), with what ExecuTorch documents for XNNPACK
   phones: `-kv --use_sdpa_with_kv_cache -X --xnnpack-extended-ops -d fp32 -qmode 8da4w
   -G 32 -E 8,0` (int4 weights in groups of 32 with int8 dynamic activations for every
   linear incl. the output layer, the embedding 8-bit per row). The checkpoint is
   SmolLM2-135M's HF folder (the one `flexrank.load_model("smollm2-135m")` caches)
   converted here as ExecuTorch's `smollm2/convert_weights.py` does through torchtune
   (not installed): key names mapped, q/k rows un-permuted from HF's rotate-half order
   to Meta's interleaved order, `output.weight` a copy of the embedding (tied). No other
   package or transformers version is needed, so no separate venv.
2. `ours`: `flexrank.exporters.export(..., format="executorch", quantize="8da4w")` (what
   `flexrank-export --format executorch --quantize 8da4w` runs) of each --checkpoint at
   --budgets, group 32, 8-bit embedding, in a child process each.
3. `measure`, in this process, every program loaded by `executorch.runtime` on --threads:
   - file MB (the `.pte`; everything is inside it);
   - prefill ms of a 64-token prompt and decode ms/token, programs interleaved step by
     step in --rounds rounds (order rotated each round); ms = median over rounds of each
     round's median step, ratio = median over rounds of the per-round ratio to the peer;
   - ExecuTorch's LLM runner (`TextLLMRunner`) on the program as it is, with SmolLM2's
     tokenizer.json: its greedy text against the program's step-by-step greedy tokens
     and the fp32 model's (`runner_check`);
   - perplexity on the last 10 % of tinyshakespeare (--eval-tokens, windows of --window
     tokens from position 0, every token after a window's first scored) and top-1
     agreement with the fp32 dense model (PyTorch, float32, same windows), every program
     fed one token per step through its KV cache (the peer returns only the last
     position's logits, so its prefill cannot score a window; the same procedure for
     all).
Writes OUT/results.json and prints a markdown table and the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_int4 import dense_folder, heldout_ids, markdown_table
from tqdm import tqdm

from flexrank.exporters.executorch.program import runner_readable_tokenizer_
from flexrank.io import atomic_dir, write_json_atomic

PROMPT = 64
PEER = "peer-8da4w"
PEER_ARGS = ("-kv", "--use_sdpa_with_kv_cache", "-X", "--xnnpack-extended-ops", "-d",
             "fp32", "-qmode", "8da4w", "-G", "32", "-E", "8,0")
META_KEYS = {  # HF name -> Meta name, as executorch/examples/models/smollm2/convert_weights
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


# ---- the peer ---------------------------------------------------------------------------

def hf_to_meta_rows(weight, heads: int):
    """q/k rows from HF's rotate-half order back to Meta's interleaved pairs (the inverse of
    transformers' convert_llama_weights_to_hf `permute`)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_checkpoint(hf_dir: Path, folder: Path) -> tuple[Path, Path]:
    """(consolidated.pth, params.json) for export_llama from the HF folder."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied: the embedding's copy below
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            key = f"layers.{index}.{META_KEYS[rest]}"
            if rest.startswith("self_attn.q_proj"):
                tensor = hf_to_meta_rows(tensor, config["num_attention_heads"])
            elif rest.startswith("self_attn.k_proj"):
                tensor = hf_to_meta_rows(tensor, config["num_key_value_heads"])
        else:
            key = META_KEYS[name]
        out[key] = tensor.float().contiguous()
    out["output.weight"] = out["tok_embeddings.weight"].clone()
    params = {"dim": config["hidden_size"], "ffn_dim_multiplier": 1,
              "hidden_dim": config["intermediate_size"],
              "n_heads": config["num_attention_heads"],
              "n_kv_heads": config["num_key_value_heads"],
              "n_layers": config["num_hidden_layers"], "norm_eps": config["rms_norm_eps"],
              "rope_theta": config["rope_theta"], "use_scaled_rope": False,
              "vocab_size": config["vocab_size"], "use_hf_rope": False,
              "attention_qkv_bias": False}
    torch.save(out, folder / "consolidated.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=1))
    return folder / "consolidated.pth", folder / "params.json"


def build_peer(out: Path, max_seq_len: int) -> Path:
    target = out / PEER
    pte = target / "model.pte"
    if pte.is_file():
        return pte
    hf_dir = dense_folder()
    config = json.loads((hf_dir / "config.json").read_text())
    metadata = json.dumps({"get_bos_id": config["bos_token_id"],
                           "get_eos_ids": [config["eos_token_id"]]})
    started = time.perf_counter()
    # export_llama takes a checkpoint whose *path* contains "8da4w" for one quantized
    # before (examples/models/llama/model.py: `elif "8da4w" in str(checkpoint_path)`) and
    # swaps its linears for torchao's pre-quantized modules: the export then dies in
    # torchao's dequantize_affine ("Expected: torch.int8, got: torch.float32"). So the
    # checkpoint goes to a folder whose path does not say 8da4w.
    with atomic_dir(target) as tmp, tempfile.TemporaryDirectory(prefix="flexrank-peer-") as raw:
        checkpoint, params = meta_checkpoint(hf_dir, Path(raw))
        assert "8da4w" not in str(checkpoint), checkpoint
        command = [sys.executable, "-m", "executorch.examples.models.llama.export_llama",
                   "--model", "smollm2", "--checkpoint", str(checkpoint), "--params",
                   str(params), *PEER_ARGS, "--max_seq_length", str(max_seq_len),
                   "--max_context_length", str(max_seq_len), "--metadata", metadata,
                   # a name ending in .pte is taken as a path as it is, not under
                   # --output-dir (export_llama_lib's output name rule), so: the full path
                   "--output-dir", str(tmp), "--output_name", str(tmp / "model.pte")]
        with open(tmp / "export.log", "w") as log:
            done = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:  # the staged folder goes when this raises; its log stays
            failed = out / "peer-export-failed.log"
            shutil.copyfile(tmp / "export.log", failed)
            tail = failed.read_text(errors="replace")[-4000:]
            raise SystemExit(f"ExecuTorch's export_llama exited {done.returncode} (its whole "
                             f"output: {failed}); the end of it:\n{tail}")
        if not (tmp / "model.pte").is_file():
            raise SystemExit(f"ExecuTorch's export_llama exited 0 but wrote no {tmp}/model.pte")
        checkpoint.unlink()  # 540 MB, only the export needs it
        (out / "peer-export-failed.log").unlink(missing_ok=True)  # an earlier attempt's
        (tmp / "command.json").write_text(json.dumps(command[1:]))
    print(f"peer export: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return pte


# ---- ours -------------------------------------------------------------------------------

EXPORT = """
from flexrank.compress.elastic import ElasticModel
from flexrank.exporters import export
from flexrank.exporters.executorch.export import ExecutorchExportConfig
elastic = ElasticModel.from_pretrained({checkpoint!r})
wanted = [b for b in elastic.budgets if abs(b - {beta!r}) < 1e-9]
assert wanted, f"budget {beta!r} not in {{elastic.budgets}}"
export(elastic, {target!r}, format="executorch", budgets=wanted, quantize="8da4w",
       config=ExecutorchExportConfig(max_seq_len={max_seq_len!r}, validate=False))
"""


def export_ours(label: str, checkpoint: Path, beta: float, out: Path, max_seq_len: int) -> Path:
    target = out / f"{label}-8da4w-b{beta:g}"
    if not (target / "flexrank-manifest.json").is_file():
        code = EXPORT.format(checkpoint=str(checkpoint), beta=beta, target=str(target),
                             max_seq_len=max_seq_len)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"export {target.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    manifest = json.loads((target / "flexrank-manifest.json").read_text())
    (entry,) = manifest["budgets"]
    return target / entry["graph"]


# ---- measuring --------------------------------------------------------------------------

class Program:
    """One `.pte`'s forward with its own calling convention: the peer's
    (tokens (1, T), input_pos (1,)) -> last logits (1, V); ours (input_ids (1, T),
    cache_position (T,)) -> logits (1, T, V)."""

    def __init__(self, name: str, path: Path):
        from flexrank.exporters.executorch.validate import load_method

        self.name, self.path = name, path
        self.peer = name == PEER
        self.forward = load_method(path)

    def last_logits(self, tokens, start: int):
        import torch

        positions = (torch.tensor([start]) if self.peer
                     else torch.arange(start, start + tokens.shape[1]))
        logits = self.forward.execute([tokens, positions])[0]
        return logits if self.peer else logits[:, -1]


def time_interleaved(programs: list[Program], steps: int, rounds: int) -> dict:
    """{name: {"prefill": [per-round s], "decode": [per-round median s/token]}}."""
    import torch

    prompt = torch.tensor(heldout_ids(dense_folder(), PROMPT))[None]
    times = {p.name: {"prefill": [], "decode": []} for p in programs}
    for index in tqdm(range(rounds), desc="timing rounds"):
        order = programs[index % len(programs):] + programs[:index % len(programs)]
        tokens = {}
        for program in order:
            started = time.perf_counter()
            logits = program.last_logits(prompt, 0)
            times[program.name]["prefill"].append(time.perf_counter() - started)
            tokens[program.name] = logits.argmax(-1, keepdim=True)
        steps_of = {p.name: [] for p in programs}
        for step in range(steps):
            for program in order:
                started = time.perf_counter()
                logits = program.last_logits(tokens[program.name], PROMPT + step)
                steps_of[program.name].append(time.perf_counter() - started)
                tokens[program.name] = logits.argmax(-1, keepdim=True)
        for name, values in steps_of.items():
            times[name]["decode"].append(statistics.median(values))
    return times


def token_by_token(program: Program, windows: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """(summed NLL in nats, argmax per scored position) over the windows, one token per step."""
    import torch

    nll, argmax = 0.0, []
    for window in tqdm(windows, desc=program.name, leave=False):
        for position in range(len(window) - 1):
            logits = program.last_logits(torch.tensor([[int(window[position])]]), position)
            logits = logits[0].double()
            nll -= float(torch.log_softmax(logits, -1)[int(window[position + 1])])
            argmax.append(int(logits.argmax()))
    return nll, np.array(argmax)


def dense_reference(windows: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """The fp32 dense model in PyTorch: (summed NLL, argmax) over the same positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_folder(), dtype=torch.float32).eval()
    nll, argmax = 0.0, []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor(window)[None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            argmax.append(logits.argmax(-1).numpy())
    return nll, np.concatenate(argmax)


RUNNER_PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."


def runner_check(programs: list[Program], new_tokens: int) -> dict:
    """ExecuTorch's own LLM runner (`TextLLMRunner`, the C++ runner of its demo apps) on
    each program as it is, with SmolLM2's tokenizer.json, greedy: its text against the
    program's greedy tokens fed step by step through `executorch.runtime` and against the
    fp32 dense model's (PyTorch). {name: {"runner", "program", "runner_equals_program",
    "agree_with_fp32": leading new tokens equal to the dense model's}}."""
    import executorch.kernels.quantized  # noqa: F401  (8da4w's quantized embedding op)
    import torch
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dense_folder())
    prompt = tokenizer(RUNNER_PROMPT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(dense_folder(), dtype=torch.float32).eval()
    with torch.no_grad():
        dense = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                               do_sample=False)[0, len(prompt):].tolist()
    found = {"prompt": RUNNER_PROMPT, "new_tokens": new_tokens,
             "fp32": tokenizer.decode(dense), "programs": {}}
    # the tokenizer.json the exporter ships now (`runner_readable_tokenizer_`; the cached
    # bundles may predate it), for every program: the peer ships none of its own
    shipped = Path(tempfile.mkdtemp(prefix="flexrank-runner-tok-"))
    shutil.copy(dense_folder() / "tokenizer.json", shipped / "tokenizer.json")
    found["tokenizer_changes"] = runner_readable_tokenizer_(shipped)
    for program in programs:
        pieces = []
        runner = TextLLMRunner(str(program.path), str(shipped / "tokenizer.json"), None)
        runner.generate(RUNNER_PROMPT, GenerationConfig(echo=False, max_new_tokens=new_tokens,
                                                        temperature=0.0),
                        token_callback=pieces.append)
        logits, greedy = program.last_logits(torch.tensor([prompt]), 0), []
        for step in range(new_tokens):
            greedy.append(int(logits.argmax()))
            if greedy[-1] == tokenizer.eos_token_id:
                break
            logits = program.last_logits(torch.tensor([[greedy[-1]]]), len(prompt) + step)
        pairs = zip(greedy, dense, strict=False)  # either may stop early at EOS
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b),
                     min(len(greedy), len(dense)))
        text = tokenizer.decode(greedy)
        found["programs"][program.name] = {
            "runner": "".join(pieces), "program": text,
            "runner_equals_program": "".join(pieces) == text, "agree_with_fp32": agree}
    return found


def programs_in(out: Path, labels: str | None = None) -> list[Program]:
    """The peer and every exported program in `out`, or those of the comma-separated
    checkpoint `labels` only."""
    found = [Program(PEER, out / PEER / "model.pte")]
    wanted = None if not labels else tuple(f"{label}-8da4w-b" for label in labels.split(","))
    for manifest in sorted(out.glob("*-8da4w-b*/flexrank-manifest.json")):
        if wanted and not manifest.parent.name.startswith(wanted):
            continue
        (entry,) = json.loads(manifest.read_text())["budgets"]
        found.append(Program(manifest.parent.name, manifest.parent / entry["graph"]))
    return found


def measure(args) -> dict:
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (the peer's sdpa)
    import torch

    torch.set_num_threads(args.threads)
    programs = programs_in(args.out, args.labels)
    ids = heldout_ids(dense_folder(), args.eval_tokens)
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - 1, args.window)]
    windows = [w for w in windows if len(w) > 1]
    scored = sum(len(w) - 1 for w in windows)
    dense_nll, dense_argmax = dense_reference(windows)
    results = {"threads": args.threads, "eval_tokens": int(scored), "window": args.window,
               "dense_fp32_perplexity": math.exp(dense_nll / scored), "programs": {}}
    for program in programs:
        nll, argmax = token_by_token(program, windows)
        results["programs"][program.name] = {
            "path": str(program.path), "mb": program.path.stat().st_size / 1e6,
            "perplexity": math.exp(nll / scored),
            "top1_vs_fp32": float((argmax == dense_argmax).mean())}
    results["runner"] = runner_check(programs, args.runner_tokens)
    times = time_interleaved(programs, args.steps, args.rounds)
    peer = times[PEER]
    for name, value in times.items():
        figures = results["programs"][name]
        figures["prefill_ms"] = 1e3 * statistics.median(value["prefill"])
        figures["decode_ms"] = 1e3 * statistics.median(value["decode"])
        figures["decode_ratio"] = statistics.median(
            a / b for a, b in zip(value["decode"], peer["decode"], strict=True))
        figures["prefill_ratio"] = statistics.median(
            a / b for a, b in zip(value["prefill"], peer["prefill"], strict=True))
    write_json_atomic(args.out / "results.json", results)
    return results


def report(results: dict) -> str:
    peer = results["programs"][PEER]
    rows = []
    for name, f in results["programs"].items():
        rows.append([name, f"{f['mb']:.1f}", f"{f['mb'] / peer['mb']:.3f}",
                     f"{f['prefill_ms']:.1f}", f"{f['decode_ms']:.2f}",
                     f"{f['decode_ratio']:.3f}", f"{f['perplexity']:.2f}",
                     f"{f['top1_vs_fp32']:.3f}"])
    table = markdown_table(["program", "MB", "× peer bytes", "prefill 64 ms", "decode ms/tok",
                            "× peer decode", "perplexity", "top-1 vs fp32"], rows)
    runner = results.get("runner", {})
    lines = [f"- {name}: TextLLMRunner's text = the program's greedy text: "
             f"{r['runner_equals_program']}; the first {r['agree_with_fp32']} new tokens are "
             f"the fp32 model's; runner: {r['runner']!r}"
             for name, r in runner.get("programs", {}).items()]
    if runner:
        lines.insert(0, f"TextLLMRunner, greedy, {runner['new_tokens']} new tokens after "
                        f"{runner['prompt']!r}; fp32 dense: {runner['fp32']!r}")
    return "\n".join([*lines, ""]) + (f"{table}\n\nfp32 dense (PyTorch) perplexity "
            f"{results['dense_fp32_perplexity']:.2f} on {results['eval_tokens']} tokens, "
            f"windows of {results['window']}, {results['threads']} threads")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("peer", "ours", "measure", "all"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/flexrank-et8da4w"))
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="LABEL=ELASTIC_FOLDER (repeatable)")
    parser.add_argument("--budgets", default="1")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--labels", help="measure: only these checkpoint labels' programs "
                        "(comma-separated) beside the peer")
    parser.add_argument("--runner-tokens", type=int, default=24,
                        help="new tokens of the TextLLMRunner check")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("peer", "all"):
        print(build_peer(args.out, args.max_seq_len), flush=True)
    if args.stage in ("ours", "all"):
        for item in args.checkpoint:
            label, folder = item.split("=", 1)
            for beta in (float(b) for b in args.budgets.split(",")):
                print(export_ours(label, Path(folder).expanduser(), beta, args.out,
                                  args.max_seq_len), flush=True)
    if args.stage in ("measure", "all"):
        print(report(measure(args)))


if __name__ == "__main__":
    main()
