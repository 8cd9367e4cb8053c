"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits non-zero."""


class TinyUNetError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class DataError(TinyUNetError):
    """A data folder, file or archive is missing, incomplete or malformed."""


class CheckpointError(TinyUNetError):
    """A checkpoint is not a tinyunet file, is damaged, or does not match the model."""


class TrainingError(TinyUNetError):
    """Training cannot go on (for example the loss became NaN)."""
