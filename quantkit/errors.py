"""User-facing errors.

Every error a user can cause (bad path, bad scheme, unreadable data, ...) is a
`QuantkitError`. The CLI turns it into one line and exit code 2; the library
lets it propagate so callers can catch it.
"""

from __future__ import annotations


class QuantkitError(Exception):
    """A problem with the user's input: one line saying what is wrong and how to fix it."""

    exit_code = 2


class SchemeError(QuantkitError):
    """A quantization scheme that cannot apply to this model."""


class UnknownNameError(QuantkitError):
    """An unknown method, preset, architecture, format or kernel name."""


class ModelSourceError(QuantkitError):
    """A model that cannot be found or read."""


class DatasetError(QuantkitError):
    """Calibration or evaluation data that cannot be read."""


class OutputExistsError(QuantkitError):
    """The output path exists and --force was not given."""


class CheckpointError(QuantkitError):
    """A checkpoint folder that is malformed or inconsistent."""


class RowsFailedError(QuantkitError):
    """Some checkpoints of an evaluation failed (each one's reason was printed); the others completed."""

    exit_code = 1
