"""Exceptions raised by the SlicerSAM engine; every user-facing failure is one of these."""

from __future__ import annotations


class SlicerSAMError(Exception):
    """Base class of the engine's errors: the message says what is wrong and how to fix it."""


class VolumeError(SlicerSAMError):
    """An image cannot be read or used (unreadable file, wrong dimensionality, bad DICOM series)."""


class PromptError(SlicerSAMError):
    """A prompt cannot be used (outside the volume, off the target slice, malformed file)."""


class OutputError(SlicerSAMError):
    """An output cannot be written (exists without overwrite, wrong grid, unwritable folder)."""


class Cancelled(SlicerSAMError):
    """The user cancelled a long operation; nothing partial was returned or written."""
