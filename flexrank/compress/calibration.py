"""Calibration batches: token sequences packed from text, JSONL, a saved `datasets`
folder, or text sampled from the model itself (data-free calibration); for models that do
not read text (ViT, CNNs), input tensors from a tensor, a .npy file or a folder of .npy and
image files (`input_batches`).

Every source is tokenised into one stream (documents joined by the EOS token), an optional
`span` of it is kept (e.g. (0, 0.8): the first 80 % of tokens for calibration), and it is
cut into non-overlapping windows of `seq_len`; `num_samples` of them are drawn with a
seeded generator, so the result is deterministic for a seed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from flexrank.compress.models import check_positions

logger = logging.getLogger(__name__)

# Below this many sequences the covariance of a 1536-wide input is rank-poor and peers
# report collapse (SVD-LLM #54 with 8 samples); warn, do not refuse.
RECOMMENDED_SAMPLES = 128


class CalibrationError(ValueError):
    """Calibration data that cannot give the requested batches."""


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(f"{path} is not UTF-8 text (byte {err.start}: "
                               f"{err.reason}); convert it to UTF-8") from err
    if not text.strip():
        raise CalibrationError(f"{path} is empty: calibration needs text")
    return text


def _jsonl_texts(path: Path, field: str = "text") -> list[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}:{number} is not valid JSON: {err.msg}") from err
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise CalibrationError(f"{path}:{number} has no string field {field!r}")
        texts.append(record[field])
    return texts


def _dataset_texts(path: Path, field: str = "text") -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError("reading a datasets folder needs `pip install datasets`") from err
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        data = data[split]
    if field not in data.column_names:
        raise CalibrationError(f"dataset {path} has no column {field!r} "
                               f"(columns: {data.column_names})")
    return list(data[field])


def load_texts(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Documents from a .txt file, a .jsonl file (`text` field), a datasets folder, or a list."""
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    texts: list[str] = []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise CalibrationError(f"calibration source {str(item)!r} does not exist; pass a "
                                   "text or .jsonl file, a datasets folder, or 'teacher'")
        if path.is_dir():
            texts.extend(_dataset_texts(path))
        elif path.suffix == ".jsonl":
            texts.extend(_jsonl_texts(path))
        else:
            texts.append(_read_text(path))
    if not any(t.strip() for t in texts):
        raise CalibrationError(f"calibration source {source} holds no text")
    return texts


def token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        # verbose=False: the whole text is one sequence here, longer than the model's
        # positions by design (pack cuts it into windows); no "sequence length" warning
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int,
         span: tuple[float, float] = (0.0, 1.0), what: str = "the text") -> torch.Tensor:
    """(num_samples, seq_len) non-overlapping windows drawn from `stream[span]`, seeded."""
    start, end = (round(f * len(stream)) for f in span)
    stream = stream[start:end]
    windows = len(stream) // seq_len
    if windows < num_samples:
        raise CalibrationError(
            f"{what} has {len(stream)} tokens in span {span}, but {num_samples} samples of "
            f"{seq_len} tokens need {num_samples * seq_len}; give more text, or lower "
            "num_samples or seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:num_samples].sort().values
    return stream[: windows * seq_len].view(windows, seq_len)[chosen]


@torch.no_grad()
def teacher_samples(model, tokenizer, num_samples: int, seq_len: int, seed: int,
                    batch_size: int = 8, temperature: float = 1.0,
                    progress: bool = True) -> torch.Tensor:
    """Sequences sampled from the model itself from its BOS token (data-free calibration)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    rows = []
    with _transformers_errors_only(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        starts = range(0, num_samples, batch_size)
        for first in tqdm(starts, desc="teacher samples", unit="batch", disable=not progress):
            n = min(batch_size, num_samples - first)
            prompt = torch.full((n, 1), bos, dtype=torch.long, device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 min_new_tokens=seq_len - 1, max_new_tokens=seq_len - 1,
                                 pad_token_id=tokenizer.eos_token_id)
            rows.append(out[:, :seq_len].cpu())
    return torch.cat(rows)


@contextmanager
def _transformers_errors_only():
    """generate() warns of "right-padding" whenever the prompt's last id is the pad id: for
    teacher samples the one-token BOS prompt, which some tokenizers share with EOS (= pad).
    There is no padding, so only transformers' errors are shown meanwhile."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def to_device(batch, device):
    """A batch (dict of tensors, or one tensor) on `device`."""
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch.to(device)


# ---- the one batch rule ----------------------------------------------------------------

TOKEN_BATCHES = ("a dict with input_ids (a (B, T) integer tensor) and optionally "
                 "attention_mask (B, T), or a bare (B, T) integer tensor of token ids")


ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class BatchError(ValueError):
    """A batch in a form that the functions taking batches do not accept."""


def takes_token_ids(model) -> bool:
    """Whether `model` reads token ids (a transformers language model or text encoder);
    other models (vision, plain nn.Module) take whatever tensor their forward takes."""
    return getattr(model, "main_input_name", None) == "input_ids"


def as_batch(batch, model) -> dict[str, torch.Tensor] | torch.Tensor:
    """One batch in the form every public function that takes batches uses
    (collect_covariances, probe, distill, evaluate_budgets, cosine_similarity).

    For a model that reads token ids: {input_ids (B, T), attention_mask (B, T), and the
    dict's other inputs}, from {input_ids[, attention_mask, ...]} or a bare (B, T) integer
    tensor (all-ones mask: every token is real); T may not exceed the model's positions
    (PositionLimitError). For any other model, the tensor, tuple of tensors or dict its
    forward takes, unchanged. Raises BatchError naming what was given and what is accepted.
    """
    if not takes_token_ids(model):
        if torch.is_tensor(batch) or isinstance(batch, Mapping) or (
                isinstance(batch, (tuple, list)) and batch and all(map(torch.is_tensor, batch))):
            return batch
        raise BatchError(f"a batch for {type(model).__name__} must be the tensor (or tuple or "
                         f"dict of tensors) its forward takes; got {_describe(batch)}")
    if torch.is_tensor(batch):
        batch = {"input_ids": batch}
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not (torch.is_tensor(ids) and ids.dim() == 2 and ids.dtype in ID_DTYPES):
        given = _describe(batch["input_ids"] if isinstance(batch, Mapping)
                          and "input_ids" in batch else batch)
        raise BatchError(f"a batch for {type(model).__name__} must be {TOKEN_BATCHES}; got "
                         f"{given}" + (" (for one sequence, add a batch axis: ids[None])"
                                       if torch.is_tensor(ids) and ids.dim() == 1 else ""))
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    elif not (torch.is_tensor(mask) and mask.shape == ids.shape):
        raise BatchError(f"attention_mask is {_describe(mask)} but input_ids has shape "
                         f"{tuple(ids.shape)}: give one mask value per token")
    check_positions(model, ids.shape[1], f"batches of {ids.shape[1]} tokens",
                    "cut the sequences to at most that many tokens (seq_len)")
    return {**batch, "input_ids": ids, "attention_mask": mask}


def _describe(value) -> str:
    """E.g. 'a float32 tensor of shape (4, 16)', 'a list of 3 str'."""
    if torch.is_tensor(value):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {len(value)} {'/'.join(kinds) or 'items'}"
    return f"a {type(value).__name__}"


# ---- inputs that are not text (vision models, plain modules) ----------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def input_batches(source, batch_size: int = 8, num_samples: int | None = None, seed: int = 0,
                  image_size: int | tuple[int, int] | None = None,
                  processor=None) -> list[torch.Tensor]:
    """Calibration batches for a model that does not read text: float32 tensors (B, ...),
    `num_samples` samples in all (None: every sample, in order; else a seeded choice).

    `source`: a tensor or numpy array (N, ...) of samples; a .npy file holding one (numpy's
    reader); or a folder of files, sorted by name, each one sample: .npy arrays (...) and
    images (IMAGE_SUFFIXES, read with Pillow). Images go through `processor` when given (a
    transformers image processor, e.g. `AutoImageProcessor.from_pretrained(model_dir)`,
    which resizes and normalises as the model was trained; its `pixel_values` are kept);
    else they are converted to RGB, resized to `image_size` (an int or (H, W); needed when
    the files differ in size) and scaled to [0, 1] as (3, H, W).

    Raises CalibrationError for a missing source, a folder without such files, samples of
    different shapes, or fewer samples than `num_samples`."""
    if batch_size < 1 or (num_samples is not None and num_samples < 1):
        raise CalibrationError(f"batch_size ({batch_size}) and num_samples ({num_samples}) "
                               "must be positive")
    samples = _input_samples(source, image_size, processor)
    if num_samples is not None:
        if num_samples > len(samples):
            raise CalibrationError(f"{_name(source)} holds {len(samples)} samples; "
                                   f"{num_samples} were asked for: give more, or lower "
                                   "num_samples")
        chosen = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
        samples = samples[chosen[:num_samples].sort().values]
    return list(samples.split(batch_size))


def _name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _input_samples(source, image_size, processor) -> torch.Tensor:
    """(N, ...) float32 samples from any `input_batches` source."""
    import numpy as np

    if torch.is_tensor(source) or isinstance(source, np.ndarray):
        data = torch.as_tensor(source)
    else:
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration source {str(source)!r} does not exist; pass "
                                   "a tensor, a .npy file or a folder of .npy/image files")
        if path.is_file():
            if path.suffix != ".npy":
                raise CalibrationError(f"{path} is not a .npy file; pass a .npy file of "
                                       "samples (N, ...) or a folder of .npy/image files")
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = _folder_samples(path, image_size, processor)
    if data.dim() < 2 or len(data) == 0:
        raise CalibrationError(f"{_name(source)} gives samples of shape {tuple(data.shape)}: "
                               "expected (N, ...) with N >= 1")
    return data.float()


def _folder_samples(folder: Path, image_size, processor) -> torch.Tensor:
    import numpy as np

    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and f.suffix.lower() in (".npy", *IMAGE_SUFFIXES))
    if not files:
        raise CalibrationError(f"{folder} holds no .npy or image files "
                               f"({', '.join(IMAGE_SUFFIXES)})")
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    pixels = iter(_read_images(images, image_size, processor)) if images else iter(())
    samples = [torch.from_numpy(np.load(f, allow_pickle=False)).float()
               if f.suffix == ".npy" else next(pixels) for f in files]
    shapes = {tuple(s.shape) for s in samples}
    if len(shapes) > 1:
        raise CalibrationError(f"the files in {folder} give samples of {len(shapes)} shapes "
                               f"({sorted(shapes)[:3]}); give image_size= (or a processor) "
                               "for images, and .npy files of one shape")
    return torch.stack(samples)


def _read_images(files: Sequence[Path], image_size, processor) -> list[torch.Tensor]:
    """(3, H, W) float32 per image: the processor's pixel_values, or RGB resized to
    `image_size` and scaled to [0, 1]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    pictures = []
    for f in files:
        try:
            with Image.open(f) as image:
                pictures.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise CalibrationError(f"{f} is not an image Pillow can read ({err})") from err
    if processor is not None:
        return list(processor(images=pictures, return_tensors="pt")["pixel_values"].float())
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        pictures = [p.resize((width, height), Image.Resampling.BILINEAR) for p in pictures]
    return [torch.from_numpy(np.asarray(p, np.float32) / 255.0).permute(2, 0, 1)
            for p in pictures]


def model_input_samples(source, model, model_dir: str | os.PathLike | None,
                        num_samples: int, seed: int = 0) -> torch.Tensor:
    """(num_samples, ...) float32 calibration inputs for `model`, a model that does not
    read text (ViT, a CNN), from `source` as `input_batches` takes it (a .npy file or a
    folder of .npy/image files), a seeded choice. Images are read as the model expects
    them: through the image processor saved in `model_dir` (preprocessor_config.json,
    transformers' AutoImageProcessor) when there is one, else resized to the model's
    config.image_size and scaled to [0, 1]. Raises CalibrationError for 'teacher' (the
    model cannot sample text), a missing or unreadable source, or too few samples."""
    if isinstance(source, str) and source == "teacher":
        raise CalibrationError(
            f"{type(model).__name__} does not read text, so it cannot be calibrated on text "
            "it samples ('teacher'): pass --calib with a folder of images or .npy files (one "
            "sample each) or a .npy file of samples (N, ...)")
    processor = None
    if model_dir is not None and (Path(model_dir) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    image_size = getattr(getattr(model, "config", None), "image_size", None)
    batches = input_batches(source, batch_size=num_samples, num_samples=num_samples, seed=seed,
                            image_size=image_size if processor is None else None,
                            processor=processor)
    return torch.cat(batches)


def model_batches(samples: torch.Tensor, batch_size: int, model) -> list:
    """Batches of `samples` in the form `as_batch` takes for `model`: `to_batches`'s
    {input_ids, attention_mask} for a model that reads token ids, else tensors (B, ...)."""
    if takes_token_ids(model):
        return to_batches(samples, batch_size)
    return list(samples.split(batch_size))


def to_batches(samples: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
            for chunk in samples.split(batch_size)]


def calibration_data(tokenizer, source="teacher", model=None, num_samples: int = 128,
                     seq_len: int = 256, seed: int = 0, batch_size: int = 8,
                     span: tuple[float, float] = (0.0, 1.0), *, held_out: bool = False
                     ) -> list[dict[str, torch.Tensor]]:
    """Batches of `{input_ids, attention_mask}` ((batch_size, seq_len) each), `num_samples`
    sequences in all. `source`: 'teacher' (needs `model`), a text/.jsonl file, a datasets
    folder saved with `save_to_disk`, or a list of such paths. With `model`, a `seq_len`
    beyond its positions is refused (PositionLimitError). Fewer than RECOMMENDED_SAMPLES
    sequences log a warning (a rank-poor covariance), unless `held_out` (text to measure
    on, not to calibrate with)."""
    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        raise CalibrationError(f"num_samples ({num_samples}), seq_len ({seq_len}) and "
                               f"batch_size ({batch_size}) must be positive, seq_len ≥ 2")
    if not (0.0 <= span[0] < span[1] <= 1.0):
        raise CalibrationError(f"span {span} must satisfy 0 <= start < end <= 1")
    if tokenizer is None:
        raise CalibrationError("calibration needs a tokenizer; for a bare nn.Module build the "
                               "input batches yourself")
    if model is not None:
        check_positions(model, seq_len, f"calibration sequences of {seq_len} tokens",
                        "lower seq_len (--seq-len)")
    if num_samples < RECOMMENDED_SAMPLES and not held_out:
        logger.warning("calibrating on %d sequences; about %d or more are recommended "
                       "(fewer give a rank-poor covariance)", num_samples, RECOMMENDED_SAMPLES)
    if isinstance(source, str) and source == "teacher":
        if model is None:
            raise CalibrationError("source 'teacher' samples text from the model: pass model=")
        if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
            raise CalibrationError(
                f"source 'teacher' samples text from the model, and "
                f"{type(model).__name__} cannot generate text (an encoder or classifier): "
                "calibrate on real text instead (--calib FILE: a text or .jsonl file or a "
                "datasets folder)")
        samples = teacher_samples(model, tokenizer, num_samples, seq_len, seed, batch_size)
    else:
        stream = token_stream(tokenizer, load_texts(source))
        prefix, suffix = _sequence_specials(tokenizer, model, seq_len)
        special = len(prefix) + len(suffix)
        samples = pack(stream, num_samples, seq_len - special, seed, span, what=f"{source}")
        if special:
            n = len(samples)
            samples = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), samples,
                                 torch.tensor(suffix, dtype=torch.long).expand(n, -1)], 1)
    return to_batches(samples, batch_size)


SPECIALS_PROBE = "a b c"  # any text: only the ids around its tokens are read


def _sequence_specials(tokenizer, model, seq_len: int) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special token ids each window gets. For an encoder or
    classifier (`model` given and unable to generate) the ones its tokenizer puts around
    every input ([CLS] … [SEP] for BERT), so calibration and distillation see inputs shaped
    as the deployed model's; none for a language model (windows of running text, as
    before). Read from the tokenizer itself: a short text encoded with and without special
    tokens, the bare ids located inside the full ones (this covers fast tokenizers whose
    post-processor adds them but whose `build_inputs_with_special_tokens` does not).
    CalibrationError when `seq_len` leaves no room for text between them."""
    if model is None or not callable(getattr(model, "can_generate", None)) \
            or model.can_generate():
        return [], []
    full = tokenizer(SPECIALS_PROBE, add_special_tokens=True)["input_ids"]
    bare = tokenizer(SPECIALS_PROBE, add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare]
    if not bare or not starts:
        logger.warning("could not tell which special tokens %s puts around an input (%r "
                       "gives %s, %s without them): calibration windows are text only",
                       type(tokenizer).__name__, SPECIALS_PROBE, full, bare)
        return [], []
    prefix, suffix = full[:starts[0]], full[starts[0] + len(bare):]
    if (prefix or suffix) and seq_len <= len(prefix) + len(suffix):
        raise CalibrationError(f"seq_len {seq_len} leaves no room for text between the "
                               f"{len(prefix) + len(suffix)} special tokens each input of "
                               "this model gets: raise seq_len (--seq-len)")
    return prefix, suffix
