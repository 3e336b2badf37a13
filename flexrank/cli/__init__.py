"""Command line: `flexrank <command>` and `flexrank-export`.

One module per command, each a thin layer over the library with an `add_parser(sub)` that
registers its arguments and its `cmd_*` function. Nothing here imports torch at import
time: `flexrank --help` and `flexrank profiles` stay fast, and each command imports what
it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from flexrank.cli import bench, compress, decompose, evaluate, export, profiles

COMMANDS = (decompose, compress, export, bench, profiles, evaluate)  # in --help's order


# Libraries that log at WARNING about their own optional parts when merely imported
# (torchao: its CUDA kernels and triton; torch's pytree: enum registration deprecations),
# or about their own defaults (onnxruntime's transformer optimizer, run by the ONNX
# simplifier on every graph: "Please specify parameters of num_heads and hidden_size for
# model_type gpt2" on a CNN): nothing a FlexRank user can act on, so shown with -v only.
QUIET_LIBRARY_LOGGERS = ("torchao", "torch.utils._pytree", "onnxruntime.transformers.optimizer")
# Libraries' notes about their own next versions, e.g. torch's pytree "isinstance(treespec,
# LeafSpec) is deprecated" while ExecuTorch exports: shown with -v only.
QUIET_WARNINGS = (FutureWarning,)
# Notes a FlexRank user cannot act on, by the start of their text: ExecuTorch's emitter on
# every decoder program ("Mutation on a buffer in the model is detected ...": the KV
# cache's buffers, whose initial values a decoder never reads).
QUIET_WARNING_MESSAGES = ("Mutation on a buffer in the model is detected",)


def _setup_logging(verbose: bool) -> None:
    """FlexRank's own messages at INFO, other libraries' at WARNING (their INFO lines, e.g.
    transformers' "Using `StaticCache` for export" on the root logger, are not the user's),
    and the loggers and warnings above hidden; -v shows everything from DEBUG up."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flexrank").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
    for message in QUIET_WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexrank", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except Exception as err:
        line = user_error(err)
        if line is None or args.verbose:  # a programming error keeps its traceback
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


def user_error(err: Exception) -> str | None:
    """The one line a user gets for `err`, or None for a programming error. Bad input
    (ValueError and its kin), a missing file and the operating system's errors (a full or
    read-only disk, a path under a file: the path, the errno's meaning, what to do) are
    the user's to fix; safetensors' I/O errors are not OSErrors, so they are named here."""
    from flexrank.io import describe_os_error

    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, OSError):
        return describe_os_error(err)
    safetensors = sys.modules.get("safetensors")  # imported by whatever raised its error
    if safetensors is not None and isinstance(err, safetensors.SafetensorError):
        return (f"safetensors: {err}; if a disk is full or read-only, free space or choose "
                "another output folder; if a file is damaged, write it again")
    return None


def export_main(argv: list[str] | None = None) -> int:
    """`flexrank-export ARGS`: `flexrank export ARGS`; -v/--verbose may come anywhere."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in argv if a in ("-v", "--verbose")]
    return main([*verbose[:1], "export", *(a for a in argv if a not in verbose)])
