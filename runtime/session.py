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

import json
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
# config.json keys holding the model's trained positions (flexrank.compress.models.POSITION_KEYS)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def status_bytes(field: str) -> int | None:
    """A `field:   N kB` line of /proc/self/status in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new peak window: Linux resets VmHWM when "5" is written to
    /proc/self/clear_refs (proc(5)). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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


def _is_id_sequence(prompt) -> bool:
    """One prompt of token ids: a 1-D sequence, or a (1, T) array (no list of prompts)."""
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 1 or (prompt.ndim == 2 and prompt.shape[0] == 1)
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer))
                                                     for t in prompt)


def timing_prompt(tokens: int) -> np.ndarray:
    """The token ids every host measurement prompts with: (tokens,) int64, cycling through
    ids 3..99 (above the usual special ids, inside any vocabulary we export). Timing only:
    the text means nothing."""
    return (np.arange(tokens) % 97 + 3).astype(np.int64)


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
                             "programs with executorch.runtime after importing "
                             "executorch.extension.llm.custom_ops.custom_ops, or with "
                             "executorch.extension.llm.runner.TextLLMRunner)")
        self.kind = self.manifest.kind
        self.layout = self.manifest.layout
        self.budgets = sorted(self.manifest.betas)
        self.threads = threads or self._manifest_threads()
        self._sessions: dict[str, object] = {}
        self.beta: float | None = None
        self.tokenizer = self._load_tokenizer()
        # the memory the model adds: the process's peak from here on, less what it holds now
        # (a compress run before it in the same process, and the tokenizer's library,
        # transformers with torch: ~430 MiB, are not the model's footprint)
        self._rss_before = status_bytes("VmRSS")
        self._peak_window = reset_peak_rss() and self._rss_before is not None
        self.set_budget(self.default_budget() if budget is None else budget)
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

            logger.debug("loading %s (%d threads)", graph, self.threads)
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
        """The bundle's tokenizer (every budget folder holds the same files), or None."""
        folders = [(self.bundle_dir / entry.graph).parent for entry in self.manifest.budgets]
        folder = next((f for f in folders if any((f / n).is_file() for n in TOKENIZER_FILES)),
                      None)
        if folder is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)

    # ---- running ------------------------------------------------------------------------

    def _ids(self, prompt) -> np.ndarray:
        """(1, T) ids of one prompt (text or ids); see `_batch` for several."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.bundle_dir} has no tokenizer: pass token ids")
            return np.array([self.tokenizer(prompt)["input_ids"]], np.int64)
        ids = np.asarray(prompt, np.int64)
        return ids[None] if ids.ndim == 1 else ids

    def _pad_id(self) -> int:
        """The id written into left padding (masked out, so any id is correct)."""
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if isinstance(value, int):
                return value
        return 0

    def _batch(self, prompt, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention_mask), both (B, T) int64, rows left-padded to one length.

        Accepted: one prompt (a string, or a 1-D sequence of ids); several (a list of
        strings, or a list of id sequences of any lengths); or a 2-D array of ids with an
        optional (B, T) `attention_mask` of ones and left-padding zeros.
        """
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str)
                                                                for p in prompt):
            rows = [self._ids(p)[0] for p in prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(p, (list, tuple, np.ndarray)) for p in prompt):
            rows = [np.asarray(p, np.int64).reshape(-1) for p in prompt]
        else:
            ids = self._ids(prompt)
            if ids.ndim != 2 or ids.shape[1] == 0:
                raise ValueError(f"prompt ids of shape {ids.shape}: give (T,) or (B, T) ids "
                                 "with T >= 1, a string, or a list of either")
            mask = (np.ones_like(ids) if attention_mask is None
                    else np.asarray(attention_mask, np.int64))
            if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
                raise ValueError(f"attention_mask of shape {mask.shape} must be 0/1 and match "
                                 f"the ids' shape {ids.shape}")
            if (np.diff(mask, axis=1) < 0).any() or (mask.sum(1) == 0).any():
                raise ValueError("attention_mask must left-pad (zeros, then ones) and keep "
                                 "at least one token per row; right padding is not supported")
            return ids, mask
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a 2-D array of ids; a list of prompts "
                             "is padded here")
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id(), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        return ids, mask

    def generate(self, prompt, max_new_tokens: int = 32, stop_at_eos: bool = True,
                 *, attention_mask=None, within_positions: bool = True):
        """Greedy generation through the KV cache: one prefill, then one token per step;
        the cache is updated in place where the bundle's graph allows it
        (`kv_cache_in_place` in the manifest; `flexrank.runtime.kv_cache.CacheDecoder`).

        `prompt`: a string, a 1-D sequence of ids or a (1, T) array -> one `Generation`; a
        list of strings, a list of id sequences (any lengths), or (B, T) ids with an
        optional left-padding `attention_mask` -> a list of B `Generation`s, each row's
        tokens those it gives alone (rows are left-padded and masked; positions count real
        tokens only, as in Hugging Face; int8 bundles quantize activations per tensor at
        run time, so there a row's tokens may depend on the others). A row stops at its
        EOS; the batch stops when every row has. Raises ValueError for a prompt it cannot
        read and when prompt + max_new_tokens exceed the positions the model was trained for
        (`within_positions=False`: timing runs only, whose tokens are unused)."""
        if self.kind != "decoder":
            raise ValueError(f"generate() needs a decoder bundle; this one is {self.kind!r}: "
                             "use encode()")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens} must be >= 1")
        single = isinstance(prompt, str) or (_is_id_sequence(prompt)
                                             and attention_mask is None)
        ids, mask = self._batch(prompt, attention_mask)
        self._check_vocabulary(ids[mask == 1])
        if within_positions:
            self._check_positions(int(mask.sum(1).max()) + max_new_tokens, max_new_tokens)
        eos = getattr(self.tokenizer, "eos_token_id", None) if stop_at_eos else None
        tokens, times = self._greedy(ids, mask, max_new_tokens, eos)
        results = []
        for i, row in enumerate(tokens):
            text = self.tokenizer.decode(row) if self.tokenizer is not None else None
            results.append(Generation(self.beta, int(mask[i].sum()), row, text, times[0],
                                      [t * 1e3 for t in times[1:]]))
        return results[0] if single else results

    def _greedy(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int,
                eos: int | None) -> tuple[list[list[int]], list[float]]:
        """Each row's new tokens (cut after its EOS) and the seconds of each step."""
        from flexrank.runtime.kv_cache import CacheDecoder

        decoder = CacheDecoder(self.session, in_place=bool(self.entry.kv_cache_in_place),
                               capacity=ids.shape[1] + max_new_tokens,
                               extra=self._extra_feed())
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (B, T): real tokens only
        tokens: list[list[int]] = [[] for _ in range(len(ids))]
        done = np.zeros(len(ids), bool)
        step_ids, times = ids, []
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            logits = decoder(step_ids, attention_mask=mask, position_ids=positions)
            step_ids = logits[:, -1].argmax(-1)[:, None]  # (B, 1)
            times.append(time.perf_counter() - start)
            for i, token in enumerate(step_ids[:, 0]):
                if not done[i]:
                    tokens[i].append(int(token))
                    done[i] = eos is not None and int(token) == eos
            if done.all():
                break
            mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return tokens, times

    def _check_vocabulary(self, ids: np.ndarray) -> None:
        """Refuse token ids outside [0, vocab): onnxruntime would stop inside the embedding
        Gather with a message about a node, not about the prompt."""
        vocab = next((o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"),
                     None) if self.kind == "decoder" else None
        if not isinstance(vocab, int):  # encoders (a classifier's logits are classes): config
            vocab = self._graph_config().get("vocab_size")
        if not isinstance(vocab, int) or ids.size == 0:
            return
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the model's vocabulary of "
                             f"{vocab} (ids 0-{vocab - 1}); {bad.size} prompt id(s) are: is the "
                             "tokenizer the model's own?")

    def _check_positions(self, length: int, new_tokens: int) -> None:
        """Refuse a generation past the positions the model was trained for (the rule of
        flexrank.compress.models.check_positions, read from the config.json beside the
        graph: the runtime loads no torch)."""
        values = self._graph_config()
        limit = next((values[k] for k in POSITION_KEYS if isinstance(values.get(k), int)), None)
        if limit is not None and length > limit:
            asked = (f"a prompt of {length - new_tokens} tokens plus {new_tokens} new tokens"
                     if new_tokens else f"an input of {length} tokens")
            raise ValueError(f"{asked} exceeds the {limit} positions the model was trained "
                             "for; shorten the input" + (" or lower max_new_tokens"
                                                         if new_tokens else ""))

    def _graph_config(self) -> dict:
        """The model's config.json beside the current budget's graph ({} when absent)."""
        config = (self.bundle_dir / self.entry.graph).parent / "config.json"
        return json.loads(config.read_text()) if config.is_file() else {}

    def encode(self, inputs) -> dict[str, np.ndarray]:
        """One forward pass of an encoder bundle: {output name: array} (a bare encoder:
        last_hidden_state (B, T, D); a classifier: logits (B, classes)).

        `inputs`: text or token ids ((T,) or (B, T)) for a text model; for a vision model
        (a graph input `pixel_values`) float pixel values (C, H, W) or (B, C, H, W),
        normalised as the model was trained. Raises ValueError for a decoder bundle and
        for inputs of another shape, vocabulary or length than the model takes."""
        if self.kind == "decoder":
            raise ValueError("encode() is for encoder bundles; use generate() for a decoder")
        feed = self._pixel_feed(inputs) if "pixel_values" in self._inputs \
            else self._text_feed(inputs)
        feed.update(self._extra_feed())
        return dict(zip(self._outputs, self.session.run(None, feed), strict=True))

    def _text_feed(self, inputs) -> dict[str, np.ndarray]:
        ids = self._ids(inputs)
        self._check_vocabulary(ids)
        self._check_positions(ids.shape[1], 0)
        feed = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = np.ones_like(ids)
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        return feed

    def _pixel_feed(self, inputs) -> dict[str, np.ndarray]:
        pixels = np.asarray(inputs, np.float32)
        pixels = pixels[None] if pixels.ndim == 3 else pixels
        declared = next(i.shape for i in self.session.get_inputs() if i.name == "pixel_values")
        fixed = [(axis, size) for axis, size in enumerate(declared)
                 if isinstance(size, int) and axis > 0]
        if pixels.ndim != len(declared) or any(pixels.shape[a] != s for a, s in fixed):
            want = ", ".join(str(s) if isinstance(s, int) else "any" for s in declared[1:])
            raise ValueError(f"pixel values of shape {pixels.shape}: this model takes ({want})"
                             f" or a batch of them, (B, {want})")
        return {"pixel_values": pixels}

    def _pixel_sample(self) -> np.ndarray:
        """One seeded image (1, C, H, W) at the size config.json gives (else 224 × 224 RGB)."""
        config = self._graph_config()
        size = config.get("image_size", 224)
        height, width = (size, size) if isinstance(size, int) else size
        shape = (1, config.get("num_channels", 3), height, width)
        return np.random.default_rng(0).standard_normal(shape, np.float32)

    def classify(self, inputs) -> dict:
        """Class scores of a classifier bundle (an encoder whose graph outputs `logits`,
        e.g. a ViT image classifier or BERT with a sequence head), for `inputs` as `encode`
        takes them: {"logits": (B, C) float32, "probabilities": (B, C) softmax,
        "labels": [the top class's name per input (config.json id2label), or its index]}.
        Raises ValueError for a bundle without class logits."""
        if self.kind == "decoder" or "logits" not in self._outputs:
            raise ValueError(f"classify() needs a classifier bundle (an encoder whose graph "
                             f"outputs logits); this {self.kind} bundle outputs "
                             f"{self._outputs}: use encode()" if self.kind != "decoder" else
                             "classify() needs a classifier bundle; use generate() for a "
                             "decoder")
        logits = self.encode(inputs)["logits"]
        if logits.ndim != 2:
            raise ValueError(f"classify() takes one class distribution per input; the logits "
                             f"have shape {logits.shape} (per token): use encode()")
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        names = self._graph_config().get("id2label") or {}
        labels = [names.get(str(int(k)), int(k)) for k in logits.argmax(-1)]
        return {"logits": logits, "probabilities": shifted / shifted.sum(-1, keepdims=True),
                "labels": labels}

    def peak_rss_bytes(self) -> int:
        """Peak resident memory of the loaded model: on Linux the process's peak since the
        session began loading its graphs (after the tokenizer), less its resident memory
        just before (so what ran earlier in the process, e.g. a compress run, and the
        tokenizer's library do not count); elsewhere the process's lifetime peak
        (`peak_rss_bytes()`)."""
        peak = status_bytes("VmHWM") if self._peak_window else None
        if peak is None:
            return peak_rss_bytes()
        # a later session in the same process resets VmHWM too; then the window no longer
        # starts at this load and the difference can be <= 0: report the peak since then
        # (an upper bound) rather than 0
        return peak - self._rss_before if peak > self._rss_before else peak

    def measure(self, prompt_tokens: int = 64, new_tokens: int = 16, repeats: int = 1) -> dict:
        """Host figures at the current budget: TTFT for a prompt of `prompt_tokens` tokens,
        decode ms/token (median, p90), load time and peak memory (`peak_rss_mb`: the
        session's, `ElasticSession.peak_rss_bytes`). Best TTFT of `repeats`.

        An encoder or classifier has no decode: its figure is the latency per inference,
        one forward pass of one input (batch 1: `prompt_tokens` token ids, or one seeded
        image at the model's size), timed `max(new_tokens, repeats)` times after a warm-up
        run: "latency_ms" (median), "latency_ms_p90", "inferences" (how many were
        timed) and "input" (what one inference was fed)."""
        prompt = timing_prompt(prompt_tokens)
        if self.kind != "decoder":
            what = f"{prompt_tokens} token ids"
            if "pixel_values" in self._inputs:  # one image at the model's size
                prompt = self._pixel_sample()
                what = f"pixel_values {tuple(prompt.shape)}"
            self.encode(prompt)  # warm-up, not timed
            times = []
            for _ in range(max(new_tokens, repeats, 1)):
                start = time.perf_counter()
                self.encode(prompt)
                times.append((time.perf_counter() - start) * 1e3)
            return {"label": "measured on host", "beta": self.beta, "threads": self.threads,
                    "prompt_tokens": prompt_tokens, "input": what, "inferences": len(times),
                    "latency_ms": statistics.median(times),
                    "latency_ms_p90": float(np.percentile(times, 90)),
                    "load_s": self.load_s, "peak_rss_mb": self.peak_rss_bytes() / 2**20}
        # timing only: a profile's prompt may pass a tiny model's positions; tokens unused
        self.generate(prompt[:8], max_new_tokens=2, stop_at_eos=False, within_positions=False)
        runs = [self.generate(prompt, new_tokens, stop_at_eos=False, within_positions=False)
                for _ in range(repeats)]
        decode = [t for r in runs for t in r.decode_ms]
        return {"label": "measured on host", "beta": self.beta, "threads": self.threads,
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "ttft_s": min(r.ttft_s for r in runs),
                "decode_ms_median": statistics.median(decode),
                "decode_ms_p90": float(np.percentile(decode, 90)),
                "decode_tokens_per_s": 1e3 / statistics.median(decode),
                "load_s": self.load_s, "peak_rss_mb": self.peak_rss_bytes() / 2**20}


__all__ = ["ElasticSession", "Generation", "peak_rss_bytes"]
