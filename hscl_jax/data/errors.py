"""The errors of the data package: each message is one line naming the bad value and what is
allowed (or how to fix it)."""

from __future__ import annotations


class DataError(ValueError):
    """A data config value that cannot work, or data that cannot be read."""


class DatasetNotPreparedError(DataError, FileNotFoundError):
    """A dataset is not in the data directory (this package never downloads one)."""


class DatasetFormatError(DataError):
    """A dataset is prepared, but not in a form the pipeline reads (ArrayRecord files holding an
    image and a class label)."""
