"""Exceptions raised by sam_core."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint cannot be used: wrong architecture, truncated, or failing its checksum.

    The message always names the file and the model that was expected.
    """
