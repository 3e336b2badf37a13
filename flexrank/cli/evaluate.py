"""`flexrank eval ELASTIC_DIR|DIST_DIR --text FILE`: perplexity per budget, and KL /
top-1 agreement with the original model when it still loads."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def cmd_eval(args) -> int:
    from pathlib import Path

    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.evaluate import evaluate_elastic, evaluate_models, tokenize_text
    from flexrank.exporters.onnx.bundle import bundle_decoders
    from flexrank.manifest import MANIFEST_FILE, load_manifest
    from flexrank.table import format_table

    path = Path(args.path)
    text = Path(args.text).read_text(encoding="utf-8")
    if (path / MANIFEST_FILE).is_file():
        manifest = load_manifest(path)
        model_id = manifest.model_id
        teacher, tokenizer = _teacher(model_id, args.no_teacher)
        if tokenizer is None:
            from transformers import AutoTokenizer
            folder = path / manifest.budgets[0].graph
            tokenizer = AutoTokenizer.from_pretrained(folder.parent, local_files_only=True)
        ids = tokenize_text(tokenizer, text, args.max_tokens)
        results = evaluate_models(bundle_decoders(path), teacher, ids, args.seq_len, args.stride)
        source = f"bundle {path} (onnxruntime)"
    else:
        elastic = ElasticModel.from_pretrained(path)
        if elastic.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer: perplexity needs one")
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
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--stride", type=int, default=None, help="default: seq-len")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--no-teacher", action="store_true",
                   help="skip KL / top-1 (do not load the original model)")
    p.set_defaults(func=cmd_eval)
