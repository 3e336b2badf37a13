"""`ElasticSession`: run a FlexRank bundle in onnxruntime and measure it.

    session = ElasticSession("dist/", budget=0.8, threads=4)
    result = session.generate("Once upon a time", max_new_tokens=32)
    session.set_budget(0.6)          # shared/elastic: no weights reloaded
    print(result.text, result.ttft_s, result.decode_ms_median)

Layouts (DESIGN.md §5): `per-budget` opens one graph per budget (loaded when first used);
`shared` opens one small graph per budget over the same weights.bin (on-disk weights are
shared, each session maps its own copy); `elastic` keeps one session and switches budget
through the `rank_level` input, so a switch costs nothing.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexrank.budget import same_budget
from flexrank.formats import RANK_LEVEL
from flexrank.manifest import Format, Manifest, budget_entry, load_manifest

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass(frozen=True)
class Generation:
    """One `generate` call, measured on this host."""

    beta: float
    prompt_tokens: int
    token_ids: list[int]
    text: str | None
    ttft_s: float  # prefill of the prompt + the first token
    decode_ms: list[float]  # each later token

    @property
    def decode_ms_median(self) -> float | None:
        return statistics.median(self.decode_ms) if self.decode_ms else None

    @property
    def decode_ms_p90(self) -> float | None:
        if not self.decode_ms:
            return None
        return float(np.percentile(self.decode_ms, 90))

    def figures(self) -> dict:
        return {"beta": self.beta, "prompt_tokens": self.prompt_tokens,
                "new_tokens": len(self.token_ids), "ttft_s": self.ttft_s,
                "decode_ms_median": self.decode_ms_median, "decode_ms_p90": self.decode_ms_p90}


class ElasticSession:
    """A bundle in onnxruntime at one budget at a time (sha256s checked on load).

    `manifest`: the in-memory manifest of the files in `bundle_dir`, for an export that
    has not written it yet (`flexrank-export` measures the files before the manifest, which
    holds the figures, is written): then nothing is read or verified.
    """

    def __init__(self, bundle_dir, budget: float | None = None, threads: int | None = None,
                 verify: bool = True, manifest: Manifest | None = None):
        started = time.perf_counter()
        self.bundle_dir = Path(bundle_dir)
        self.manifest = (manifest if manifest is not None
                         else load_manifest(self.bundle_dir, verify=verify))
        if self.manifest.export_format not in (Format.ONNX, Format.ORT):
            raise ValueError(f"{self.bundle_dir} is a {self.manifest.export_format} "
                             "bundle; ElasticSession runs onnx and ort bundles (run .pte "
                             "programs with executorch.runtime)")
        self.kind = self.manifest.kind
        self.layout = self.manifest.layout
        self.budgets = sorted(self.manifest.betas)
        self.threads = threads or self._manifest_threads()
        self._sessions: dict[str, object] = {}
        self.tokenizer = None
        self.beta: float | None = None
        self.set_budget(self.default_budget() if budget is None else budget)
        self.tokenizer = self._load_tokenizer()
        self.load_s = time.perf_counter() - started

    # ---- budgets ------------------------------------------------------------------------

    def default_budget(self) -> float:
        deployment = self.manifest.deployment
        chosen = deployment.chosen_beta if deployment else None
        same = [b for b in self.budgets if chosen is not None and same_budget(b, chosen)]
        return same[0] if same else max(self.budgets)

    def _manifest_threads(self) -> int:
        deployment = self.manifest.deployment
        return int(deployment.threads if deployment and deployment.threads else 2)

    def set_budget(self, beta: float) -> ElasticSession:
        entry = budget_entry(self.manifest, beta)  # BundleError listing the budgets
        graph = entry.graph
        if graph not in self._sessions:
            from flexrank.runtime.kv_cache import make_session

            logger.info("loading %s (%d threads)", graph, self.threads)
            self._sessions[graph] = make_session(self.bundle_dir / graph, self.threads,
                                                 spinning=True)
        self.session = self._sessions[graph]
        self.entry = entry
        self.beta = entry.beta
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        return self

    @property
    def loaded_graphs(self) -> int:
        return len(self._sessions)

    def _extra_feed(self) -> dict:
        if RANK_LEVEL in self._inputs:
            return {RANK_LEVEL: np.array([self.entry.rank_level], np.int64)}
        return {}

    def _load_tokenizer(self):
        folder = (self.bundle_dir / self.entry.graph).parent
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)

    # ---- running ------------------------------------------------------------------------

    def _ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.bundle_dir} has no tokenizer: pass token ids")
            return np.array([self.tokenizer(prompt)["input_ids"]], np.int64)
        ids = np.asarray(prompt, np.int64)
        return ids[None] if ids.ndim == 1 else ids

    def generate(self, prompt, max_new_tokens: int = 32, stop_at_eos: bool = True,
                 ) -> Generation:
        """Greedy generation through the KV cache: one prefill, then one token per step;
        the cache is updated in place where the bundle's graph allows it
        (`kv_cache_in_place` in the manifest; `exporters/validate.CacheDecoder`)."""
        from flexrank.runtime.kv_cache import CacheDecoder

        if self.kind != "decoder":
            raise ValueError(f"generate() needs a decoder bundle; this one is {self.kind!r}: "
                             "use encode()")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens} must be >= 1")
        prompt_ids = self._ids(prompt)
        eos = getattr(self.tokenizer, "eos_token_id", None) if stop_at_eos else None
        decoder = CacheDecoder(self.session, in_place=bool(self.entry.kv_cache_in_place),
                               capacity=prompt_ids.shape[1] + max_new_tokens,
                               extra=self._extra_feed())
        ids, tokens, times = prompt_ids, [], []
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            ids = decoder(ids)[:, -1].argmax(-1)[:, None]
            times.append(time.perf_counter() - start)
            tokens.append(int(ids[0, 0]))
            if eos is not None and tokens[-1] == eos:
                break
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return Generation(self.beta, int(prompt_ids.shape[1]), tokens, text, times[0],
                          [t * 1e3 for t in times[1:]])

    def encode(self, inputs) -> dict[str, np.ndarray]:
        """One forward pass of an encoder bundle: {output name: array}."""
        if self.kind == "decoder":
            raise ValueError("encode() is for encoder bundles; use generate() for a decoder")
        ids = self._ids(inputs)
        feed = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = np.ones_like(ids)
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        feed.update(self._extra_feed())
        return dict(zip(self._outputs, self.session.run(None, feed), strict=True))

    def measure(self, prompt_tokens: int = 64, new_tokens: int = 16, repeats: int = 1) -> dict:
        """Host figures at the current budget: TTFT for a prompt of `prompt_tokens` tokens,
        decode ms/token (median, p90), load time and peak memory. Best TTFT of `repeats`."""
        vocab_low = 3  # skip the usual special ids
        prompt = (np.arange(prompt_tokens) % 97 + vocab_low).astype(np.int64)
        if self.kind != "decoder":
            times = []
            for _ in range(repeats + 1):  # the first run warms up
                start = time.perf_counter()
                self.encode(prompt)
                times.append(time.perf_counter() - start)
            return {"label": "measured on host", "beta": self.beta, "threads": self.threads,
                    "prompt_tokens": prompt_tokens, "latency_ms": min(times[1:]) * 1e3,
                    "load_s": self.load_s, "peak_rss_mb": peak_rss_bytes() / 2**20}
        self.generate(prompt[:8], max_new_tokens=2, stop_at_eos=False)  # warm-up
        runs = [self.generate(prompt, new_tokens, stop_at_eos=False) for _ in range(repeats)]
        decode = [t for r in runs for t in r.decode_ms]
        return {"label": "measured on host", "beta": self.beta, "threads": self.threads,
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "ttft_s": min(r.ttft_s for r in runs),
                "decode_ms_median": statistics.median(decode),
                "decode_ms_p90": float(np.percentile(decode, 90)),
                "decode_tokens_per_s": 1e3 / statistics.median(decode),
                "load_s": self.load_s, "peak_rss_mb": peak_rss_bytes() / 2**20}


__all__ = ["ElasticSession", "Generation", "peak_rss_bytes"]
