"""Decoding an exported decoder in onnxruntime with its KV cache: sessions, feeds, the
in-place cache (`CacheDecoder`) and greedy generation. numpy and onnxruntime only."""

from __future__ import annotations

import numpy as np


def make_session(path, threads: int = 2, extra_inputs: dict | None = None,
                 spinning: bool = False):
    """A CPU session. Validation alternates onnxruntime with PyTorch, whose cores spinning
    onnxruntime threads would steal, so spinning is off unless asked for (deployment:
    spinning threads pick up each MatMul sooner; SmolLM2 decodes 10-20 % faster with it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decoder_feed(session, input_ids: np.ndarray, past: dict | None, past_len: int,
                 cache: bool = True) -> dict:
    """input_ids, an all-ones attention_mask, consecutive position_ids and (with `cache`)
    past_key_values.* from `past`'s present.* arrays (empty ones when `past` is None)."""
    batch, length = input_ids.shape
    feed = {"input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_len + length), np.int64)}
    names = {i.name: i for i in session.get_inputs()}
    if "position_ids" in names:
        feed["position_ids"] = np.tile(np.arange(past_len, past_len + length), (batch, 1))
    for name, info in names.items():
        if cache and name.startswith("past_key_values."):
            if past is None:
                heads, head_dim = info.shape[1], info.shape[3]
                feed[name] = np.zeros((batch, heads, 0, head_dim), np.float32)
            else:
                feed[name] = past[name.replace("past_key_values.", "present.")]
    return feed  # inputs beyond these (the elastic `rank_level`) come from the caller


class CacheDecoder:
    """Calls of a KV-cache decoder graph that keep the cache from one call to the next:
    `logits = decoder(ids)` for the prompt, then for each new token.

    `in_place` (graphs whose manifest entry says `kv_cache_in_place`): each
    past_key_values.i.* and its present.i.* are bound (IOBinding) to one preallocated buffer
    of `capacity` positions that GroupQueryAttention updates in place, doubled when full,
    instead of the op copying the whole cache into a new `present` on every call (SmolLM2 at
    1,000 cached positions: a decode step 13-15 % faster; benchmarks/bench_kv_cache.py).
    Only for such graphs: elsewhere the buffer's size would be read as the cached length.
    Otherwise each call's present.* arrays are fed back as the next call's past.
    `attention_mask` / `position_ids` default to all ones / consecutive positions; `extra`
    is fed on every call (`rank_level`). One decoder per sequence batch."""

    def __init__(self, session, in_place: bool = False, capacity: int = 256,
                 extra: dict | None = None):
        self.session, self.in_place, self.extra = session, in_place, extra or {}
        self.capacity = max(1, capacity)
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]
        self.cache_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.past_len = 0
        self.past: dict | None = None  # present.* arrays (not in place)
        self.buffers: dict[str, np.ndarray] = {}  # past_key_values.* buffers (in place)
        self.binding = None
        self.logits: np.ndarray | None = None  # in place: the bound logits output
        vocab = next((o.shape[-1] for o in session.get_outputs() if o.name == "logits"), None)
        if in_place and not isinstance(vocab, int):
            raise ValueError("in-place caching needs the graph's logits to have a fixed "
                             f"vocabulary size, not {vocab!r}")
        self.vocab = vocab

    def _grow(self, batch: int, total: int) -> None:
        """Buffers for at least `total` positions (doubling), bound once to a reusable
        IOBinding: past_key_values.i.* and present.i.* to the same buffer."""
        import onnxruntime as ort

        if self.buffers:
            held = next(iter(self.buffers.values())).shape
            if held[0] != batch:
                raise ValueError(f"this cache holds a batch of {held[0]}, not {batch}: use "
                                 "a new CacheDecoder for another batch")
            if total <= held[2]:
                return
        while self.capacity < total:
            self.capacity *= 2
        self.binding = self.session.io_binding()
        for name in self.cache_names:
            info = self.inputs[name]
            buffer = np.zeros((batch, info.shape[1], self.capacity, info.shape[3]), np.float32)
            if name in self.buffers:
                buffer[:, :, :self.past_len] = self.buffers[name][:, :, :self.past_len]
            self.buffers[name] = buffer
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # the buffer itself, no copy
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        for name in self.outputs:
            if name != "logits" and not name.startswith("present."):
                self.binding.bind_output(name, "cpu")
        self.logits = None

    def __call__(self, ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 position_ids: np.ndarray | None = None) -> np.ndarray:
        batch, length = ids.shape
        total = self.past_len + length
        feed = decoder_feed(self.session, ids, self.past, self.past_len,
                            cache=not self.in_place)  # in place: the buffers are bound
        if attention_mask is not None:
            feed["attention_mask"] = attention_mask
        if position_ids is not None and "position_ids" in self.inputs:
            feed["position_ids"] = position_ids
        feed.update(self.extra)
        if not self.in_place:
            outputs = dict(zip(self.outputs, self.session.run(None, feed), strict=True))
            self.past = {k: v for k, v in outputs.items() if k.startswith("present.")}
            self.past_len = total
            return outputs["logits"]
        import onnxruntime as ort

        self._grow(batch, total)
        self.past_len = total
        for name, value in feed.items():
            self.binding.bind_cpu_input(name, value)
        shape = (batch, length, self.vocab)
        if self.logits is None or self.logits.shape != shape:  # a prefill, or the first step
            self.logits = np.empty(shape, np.float32)
            self.binding.bind_ortvalue_output("logits",
                                              ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.session.run_with_iobinding(self.binding)
        return self.logits.copy()


def onnx_greedy(session, prompt: np.ndarray, steps: int, feed_extra: dict | None = None,
                ) -> np.ndarray:
    """Greedy tokens through the KV-cache graph: prefill once, then one token a step."""
    out_names = [o.name for o in session.get_outputs()]
    ids, past, past_len, tokens = prompt, None, 0, []
    for _ in range(steps):
        feed = decoder_feed(session, ids, past, past_len)
        feed.update(feed_extra or {})
        outputs = dict(zip(out_names, session.run(None, feed), strict=True))
        past_len += ids.shape[1]
        past = {k: v for k, v in outputs.items() if k.startswith("present.")}
        ids = outputs["logits"][:, -1].argmax(-1)[:, None]
        tokens.append(ids)
    return np.concatenate(tokens, axis=1)
