"""`flexrank eval ELASTIC_DIR|DIST_DIR --text FILE`: perplexity per budget, and KL /
top-1 agreement with the original model when it still loads."""

from __future__ import annotations

import logging

from flexrank.cli.compress import whole_number

logger = logging.getLogger(__name__)


def cmd_eval(args) -> int:
    from pathlib import Path

    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.evaluate import evaluate_elastic, evaluate_models, tokenize_text
    from flexrank.exporters.onnx.bundle import bundle_decoders
    from flexrank.manifest import MANIFEST_FILE, load_manifest
    from flexrank.table import format_table

    if args.stride is not None and args.stride > args.seq_len:
        raise ValueError(f"--stride {args.stride} is more than --seq-len {args.seq_len}: windows "
                         "would skip tokens; give a stride between 1 and the sequence length")
    path = Path(args.path)
    text = read_text(Path(args.text))
    if (path / MANIFEST_FILE).is_file():
        manifest = load_manifest(path)
        model_id = manifest.model_id
        teacher, tokenizer = _teacher(model_id, args.no_teacher)
        if tokenizer is None:
            tokenizer = bundle_tokenizer(path, (path / manifest.budgets[0].graph).parent)
        ids = tokenize_text(tokenizer, text, args.max_tokens)
        results = evaluate_models(bundle_decoders(path), teacher, ids, args.seq_len, args.stride)
        source = f"bundle {path} (onnxruntime)"
    else:
        elastic = ElasticModel.from_pretrained(path)
        if elastic.tokenizer is None:
            raise ValueError(f"elastic checkpoint {path} has no tokenizer (none of "
                             f"{', '.join(TOKENIZER_FILES)} loads there): perplexity needs one; "
                             "copy the original model's tokenizer files into it")
        teacher, _ = _teacher(elastic.model_id, args.no_teacher)
        ids = tokenize_text(elastic.tokenizer, text, args.max_tokens)
        results = evaluate_elastic(elastic, teacher, ids, seq_len=args.seq_len,
                                   stride=args.stride)
        source = f"elastic checkpoint {path} (PyTorch)"
    keys = ["ppl"] + (["kl", "top1"] if teacher is not None else [])
    rows = [[beta] + [row[k] for k in keys] for beta, row in sorted(results.items())]
    print(format_table(["budget", *keys], rows,
                       title=f"\n{source}: {len(ids)} tokens of {args.text}, windows of "
                             f"{args.seq_len}"))
    return 0


def read_text(path):
    """The text of `path`; ValueError naming the file where it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--text {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                         f"offset {err.start}): pass a UTF-8 file, e.g. converted with "
                         f"`iconv -f latin1 -t utf-8 {path}`") from None


# The files a Hugging Face tokenizer loads from (fast, SentencePiece, BPE vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def bundle_tokenizer(bundle, folder):
    """The tokenizer saved in the bundle's budget folder `folder`; ValueError naming the
    folder and the files expected where it has none (a model exported without one)."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"bundle {bundle} has no tokenizer files in {folder} (expected one of "
            f"{', '.join(TOKENIZER_FILES)}; they are exported only from an elastic checkpoint "
            "that has a tokenizer): copy the original model's tokenizer files (tokenizer.json "
            "and tokenizer_config.json) there")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"the tokenizer files of bundle {bundle} in {folder} do not load "
                         f"({err}): copy the original model's tokenizer files there") from None


def _teacher(model_id, skip: bool):
    """The original model, for KL/top-1, when its id still loads (an alias or a path)."""
    if skip or not model_id:
        return None, None
    from flexrank.compress.models import ModelLoadError, load_model
    try:
        return load_model(model_id)
    except ModelLoadError:
        logger.warning("original model %r not found: reporting perplexity only", model_id)
        return None, None


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and KL / top-1 to the original model) of an "
                                    "elastic checkpoint or a per-budget ONNX bundle, per budget")
    p.add_argument("path", help="ELASTIC_DIR (scored in PyTorch) or DIST_DIR (onnxruntime)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--seq-len", type=whole_number(2), default=256,
                   help="tokens per scored window")
    p.add_argument("--stride", type=whole_number(1), default=None,
                   help="tokens between windows, at most --seq-len (default: seq-len)")
    p.add_argument("--max-tokens", type=whole_number(2), default=8192,
                   help="tokens of the text scored")
    p.add_argument("--no-teacher", action="store_true",
                   help="skip KL / top-1 (do not load the original model)")
    p.set_defaults(func=cmd_eval)
