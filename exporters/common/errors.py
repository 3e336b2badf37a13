"""Typed validation errors, raised when an exported graph or program does not compute
what the PyTorch model does (as optimum's exporters do: ShapeError, AtolError, ...)."""

from __future__ import annotations


class ExportValidationError(ValueError):
    """The exported graph does not compute what the PyTorch model does."""


class OutputNamesError(ExportValidationError):
    pass


class ShapeError(ExportValidationError):
    pass


class OutputMismatchError(ExportValidationError):
    pass


class GenerationMismatchError(ExportValidationError):
    pass
