"""Issue 15: A/B decode timing of int4 decoder folders without the rest of bench_int4.py
(no fp32 model in the rounds, no quality): onnxruntime-genai models interleaved step by
step (2 intra-op threads, the order rotated each round; ms = median over rounds of each
round's median step, ratio = median of per-round ratios to the first folder), then plain
onnxruntime sessions of the same graphs, one decode step after a 64-token cache,
interleaved (no og, no shared cache buffer).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_int4_ab.py ROUNDS STEPS \
        PROMPT_IDS.npy builder=FOLDER before=FOLDER ours=FOLDER
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og

KV_HEADS, HEAD_SIZE = 3, 64  # SmolLM2-135M's cache


def og_model(folder: str):
    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": 2, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def generator(model, prompt: np.ndarray, steps: int):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps + 2, do_sample=False)
    return og.Generator(model, params)


def decode_feed(session, past: int = 64) -> dict:
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = np.array([[42]], np.int64)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones((1, past + 1), np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.array([[past]], np.int64)
        elif i.name.startswith("past_key_values"):
            shape = (1, KV_HEADS, past, HEAD_SIZE)
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def og_rounds(folders: dict, prompt: np.ndarray, rounds: int, steps: int) -> None:
    """onnxruntime-genai decode, models interleaved step by step, order rotated."""
    first = next(iter(folders))
    models = {name: og_model(folder) for name, folder in folders.items()}
    names = list(models)
    res = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        gens = {}
        for n in order:
            gens[n] = generator(models[n], prompt, steps)
            gens[n].append_tokens(prompt)
            gens[n].generate_next_token()  # the prompt's next token: no forward pass
        times = {n: [] for n in order}
        for _ in range(steps):
            for n in order:
                started = time.perf_counter()
                gens[n].generate_next_token()
                times[n].append(time.perf_counter() - started)
        for n in order:
            res[n].append(statistics.median(times[n]))
        del gens
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(res[n], res[first], strict=True))
        print("og", n, "ms", round(1e3 * statistics.median(res[n]), 2), "ratio",
              round(ratio, 3), "rounds", [round(1e3 * x, 1) for x in res[n]])


def ort_rounds(folders: dict, rounds: int, steps: int) -> None:
    """Plain onnxruntime sessions, one decode step after a 64-token cache, interleaved."""
    first = next(iter(folders))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    sessions = {n: ort.InferenceSession(f + "/model.onnx", options,
                                        providers=["CPUExecutionProvider"])
                for n, f in folders.items()}
    feeds = {n: decode_feed(s) for n, s in sessions.items()}
    times = {n: [] for n in sessions}
    for _ in range(rounds * steps):
        for n, session in sessions.items():
            started = time.perf_counter()
            session.run(["logits"], feeds[n])
            times[n].append(time.perf_counter() - started)
    for n in sessions:
        print("ort", n, "ms", round(1e3 * statistics.median(times[n]), 2), "ratio",
              round(statistics.median(times[n]) / statistics.median(times[first]), 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rounds", type=int)
    p.add_argument("steps", type=int)
    p.add_argument("prompt_ids", help=".npy of token ids (the first 64 are the prompt)")
    p.add_argument("folders", nargs="+", help="NAME=FOLDER; the first is the reference")
    args = p.parse_args()
    prompt = np.load(args.prompt_ids)[:64].astype(np.int32)
    folders = dict(item.split("=", 1) for item in args.folders)
    og_rounds(folders, prompt, args.rounds, args.steps)
    ort_rounds(folders, args.rounds, args.steps)


if __name__ == "__main__":
    main()
