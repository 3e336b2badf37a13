"""`genai_config.json` for onnxruntime-genai, so that `og.Model(budget_dir)` runs a decoder
budget folder as it is (the runtime of onnxruntime's Android/iOS LLM packages).

The fields are those onnxruntime-genai's own model builder writes for a Llama
(`onnxruntime_genai.models.builders.base.Model.make_genai_config`, 0.18): the decoder
graph's input and output names (the KV cache as `past_key_values.%d.key` ->
`present.%d.key`, Hugging Face's names, which the exporter keeps), head counts and sizes,
context length, special token ids, and the search defaults (greedy unless the model's
generation config says otherwise).

`past_present_share_buffer` lets onnxruntime-genai bind each past/present pair to one
buffer of `max_length` positions, which only a graph whose GroupQueryAttention reads the
cache length from the attention mask can run (the manifest's `kv_cache_in_place`).

The shared layout keeps every budget's graph in one folder over one weights.bin; its
genai_config.json names the largest budget's graph, and another budget runs from the same
folder with one overlay (onnxruntime-genai refuses a `filename` with `..` in it, so a
subfolder per budget cannot point back at the shared weights):

    config = og.Config("shared")
    config.overlay('{"model": {"decoder": {"filename": "model-budget-0.5.onnx"}}}')
    model = og.Model(config)

The elastic layout's one graph takes the budget as its int64 input `rank_level` ([1]; the
manifest's `rank_level` of each budget, 0 = the smallest), which onnxruntime-genai passes
through as an extra model input (tests/test_genai.py):

    model = og.Model("elastic")
    generator = og.Generator(model, og.GeneratorParams(model))
    generator.set_model_input("rank_level", numpy.array([level], numpy.int64))
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

from flexrank.io import atomic_path

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# SentencePiece tokenizer classes a byte-level BPE can be saved under (SmolLM2 rebuilt from
# GGUF), and the class of a byte-level BPE, which onnxruntime-extensions splits as GPT-2
SPM_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})
BYTE_LEVEL_CLASS = "GPT2Tokenizer"
# the decoder Hugging Face's GPT-2 tokenizer has: bytes back from the byte-level alphabet
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                      "use_regex": True}
SPM_SPACE = "\u2581"  # "▁", SentencePiece's space
# model.type values onnxruntime-genai 0.18 runs as a plain decoder-only graph; any other
# architecture is written as "llama", whose runtime path is the same (the graph does all
# the architecture's maths)
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
                           "gemma3_text", "granite", "olmo", "smollm3", "gpt2"})
# onnxruntime-genai's search defaults (the builder's, for a model without a generation
# config): greedy, one beam, no penalties
SEARCH_DEFAULTS = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
                   "length_penalty": 1.0, "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0}
# sampling fields the model's generation config may set
SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def _io_names(graph: onnx.GraphProto) -> tuple[dict, dict]:
    """The builder's `inputs` and `outputs` maps for a decoder graph with a KV cache.

    Raises ValueError naming what is missing when the graph is not one."""
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    wanted = {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"}
    missing = sorted(wanted - inputs) + sorted({"logits", "present.0.key"} - outputs)
    if missing:
        raise ValueError(f"the decoder graph lacks {missing}: onnxruntime-genai needs "
                         "input_ids, attention_mask and a KV cache named past_key_values.<i>."
                         "key|value -> present.<i>.key|value (optimum's text-generation-with-"
                         "past export)")
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    names |= {"past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    return names, {"logits": "logits", "present_key_names": "present.%d.key",
                   "present_value_names": "present.%d.value"}


def _token_ids(model) -> tuple[int, int | list[int], int]:
    """(bos, eos, pad) from the generation config, else the model config; pad defaults
    to the (first) eos id, as the builder does.

    Raises ValueError when the model names no eos id (onnxruntime-genai needs one)."""
    config, generation = model.config, getattr(model, "generation_config", None)

    def first(name):
        for source in (generation, config):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return None

    bos, eos, pad = first("bos_token_id"), first("eos_token_id"), first("pad_token_id")
    if eos is None:
        raise ValueError("the model config has no eos_token_id, which onnxruntime-genai needs "
                         "to stop generating; set model.config.eos_token_id before exporting")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return (1 if bos is None else int(bos),
            [int(i) for i in eos_ids] if len(eos_ids) > 1 else int(eos_ids[0]),
            int(eos_ids[0] if pad is None else pad))


def genai_config(model, graph: onnx.GraphProto, filename: str, share_buffer: bool,
                 max_length: int | None = None) -> dict:
    """The genai_config of a decoder graph file `filename` exported from `model` (a
    transformers causal LM); `share_buffer`: the graph may update its KV cache in place;
    `max_length`: the tokens a generator may hold, prompt + generated (with `share_buffer`
    the KV cache's positions), None or above the model's context: the model's context."""
    config = model.config
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    context = int(getattr(config, "max_position_embeddings", None)
                  or getattr(config, "n_positions", None) or 2048)
    inputs, outputs = _io_names(graph)
    bos, eos, pad = _token_ids(model)
    model_type = str(getattr(config, "model_type", "llama"))
    search = dict(SEARCH_DEFAULTS)
    generation = getattr(model, "generation_config", None)
    for key in SAMPLING:
        value = getattr(generation, key, None) if generation is not None else None
        if value is not None:
            search[key] = value
    length = context if max_length is None else min(int(max_length), context)
    search |= {"max_length": length, "past_present_share_buffer": bool(share_buffer)}
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(getattr(config, "head_dim", None) or hidden // heads),
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": int(config.num_hidden_layers),
                "num_key_value_heads": int(getattr(config, "num_key_value_heads", None)
                                           or heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type if model_type in DECODER_TYPES else "llama",
            "vocab_size": int(config.vocab_size),
        },
        "search": search,
    }


def write_genai_config(model, graph: onnx.GraphProto, graph_path: Path,
                       share_buffer: bool, max_length: int | None = None) -> Path | None:
    """Write `genai_config.json` beside the decoder graph file `graph_path` (.onnx, or the
    .ort file converted from it), whose inputs and outputs are those of `graph`; returns
    its path, or None, with a warning saying why, for a decoder onnxruntime-genai cannot
    run (no eos token id, no KV cache inputs): the bundle is still complete without it."""
    try:
        config = genai_config(model, graph, graph_path.name, share_buffer, max_length)
    except ValueError as error:
        logger.warning("%s: no %s written (%s)", graph_path.parent, GENAI_CONFIG, error)
        return None
    path = graph_path.parent / GENAI_CONFIG
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _steps(part: dict | None) -> list[dict]:
    """The steps of a tokenizer.json component (a Sequence or one step)."""
    if not part:
        return []
    for key in ("decoders", "pretokenizers", "normalizers"):
        if part.get("type") == "Sequence" and key in part:
            return part[key]
    return [part]


def og_readable_tokenizer_(folder: Path) -> list[str]:
    """Make a byte-level BPE tokenizer in `folder` read by onnxruntime-genai's tokenizer
    (onnxruntime-extensions) as Hugging Face reads it, in place; returns what changed
    (tokenizer.json's decoder, tokenizer_config.json's class), empty when nothing did.

    Why: transformers rebuilds SmolLM2's tokenizer from its GGUF file as a
    `LlamaTokenizer` with a SentencePiece Llama's decoder (ByteFallback, Fuse, Replace
    "▁" -> " ", then ByteLevel). onnxruntime-extensions does not run tokenizer.json's
    pre-tokenizer: it takes a Replace-"▁" decoder as the mark of a SentencePiece model
    and encodes every space as "▁", which a byte-level vocabulary lacks ("The history of
    the printing press" became 504, -1, -1, -1, ...), and with a Llama class it splits
    words by a case-insensitive regex ("'True" -> "'T", "rue"), unlike GPT-2's. So the
    decoder becomes GPT-2's ByteLevel and the class GPT-2's, which SmolLM2's own
    Hugging Face tokenizer has. Nothing else moves: only a byte-level BPE whose vocabulary
    has no "▁" and no <0xNN> byte-fallback token is touched (the dropped decoder steps did
    nothing on it), and Hugging Face's fast tokenizer encodes and decodes from
    tokenizer.json, whatever the class.
    """
    path, config_path = folder / TOKENIZER_FILE, folder / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    byte_level = any(step.get("type") == "ByteLevel" for step in _steps(data.get("pre_tokenizer")))
    vocab = model.get("vocab") or {}
    spm_tokens = any(SPM_SPACE in token or token.startswith("<0x") for token in vocab)
    if model.get("type") != "BPE" or not byte_level or spm_tokens:
        return []
    changed = []
    if any(step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == SPM_SPACE
           for step in _steps(data.get("decoder"))):
        data["decoder"] = dict(BYTE_LEVEL_DECODER)
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        changed.append(f"{TOKENIZER_FILE}: decoder ByteLevel")
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") in SPM_CLASSES:
            config["tokenizer_class"] = BYTE_LEVEL_CLASS
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                   encoding="utf-8")
            changed.append(f"{TOKENIZER_CONFIG_FILE}: tokenizer_class {BYTE_LEVEL_CLASS}")
    if changed:
        logger.debug("%s: byte-level BPE tokenizer made readable by onnxruntime-genai (%s)",
                    folder, "; ".join(changed))
    return changed
