"""One small hierarchy of typed errors.

Every error samedge raises on bad input derives from :class:`SamedgeError`, carries a message that
says what is wrong and a ``hint`` that says what to do, so the CLI can print both and exit non-zero
without a traceback, and callers can catch one family of problems without parsing strings.
"""

from __future__ import annotations


class SamedgeError(Exception):
    """Base class: ``str(err)`` is the problem, ``err.hint`` the suggested fix."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class CheckpointError(SamedgeError):
    """A checkpoint is missing, unreadable, truncated or not a state dict."""


class FamilyMismatchError(CheckpointError):
    """The checkpoint belongs to another model family or size than the one requested."""


class KeyMismatchError(CheckpointError):
    """Keys or shapes of a checkpoint do not fit the model built for it."""


class ImageError(SamedgeError):
    """An input image is unreadable, of the wrong dimensionality, empty or contains NaN/Inf."""


class StackDepthError(ImageError):
    """A depth model got a stack of the wrong number of slices (its encoder's D is fixed)."""


class PromptError(SamedgeError):
    """A prompt is empty, malformed or lies outside the image."""


class ExportError(SamedgeError):
    """An exported graph failed to build or disagrees with PyTorch beyond its declared tolerance."""


class BundleError(SamedgeError):
    """A bundle is incomplete, tampered with, or was written by an incompatible samedge."""


class UsageError(SamedgeError):
    """An option is out of its range (a thread count beyond the cores) or an output would
    overwrite an input."""


class BackendUnavailableError(SamedgeError):
    """The requested inference backend is not installed or cannot run on this machine."""


class EngineCompatibilityError(BundleError):
    """An engine was built for another TensorRT version or GPU than the one present."""


class DataSourceError(SamedgeError):
    """Calibration or validation data is missing, unreadable or inconsistent."""


class GateFailedError(SamedgeError):
    """A quantized or reduced-precision variant drifted beyond its accuracy gate."""

    exit_code = 1


class PrecisionUnsupportedError(SamedgeError):
    """This machine cannot execute the requested arithmetic natively, so it cannot measure it."""
