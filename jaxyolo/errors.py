"""Errors the library raises on bad input.

Every error names the file, field or key at fault and what is wrong with it, in one line, so a
user never has to read a stack trace from inside JAX to find out what to fix.
"""


class JaxyoloError(Exception):
    """Base class of every error jaxyolo raises on purpose."""


class ConfigError(JaxyoloError, ValueError):
    """A model table, hyper-parameter file or option is malformed."""


class CheckpointError(JaxyoloError, ValueError):
    """A checkpoint file is unreadable, corrupt, hostile, or does not fit the model."""


class ExportError(JaxyoloError, RuntimeError):
    """An export could not be built, or its outputs differ from the JAX model's beyond the
    stated tolerance (then nothing is written)."""
