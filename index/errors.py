"""Errors the store raises; each names the problem (and the file, where one is involved)."""


class IndexError_(Exception):
    """Base class for store errors."""


class StoreMismatch(IndexError_):
    """The data directory was written for another model or vector dimension."""


class CorruptStoreFile(IndexError_):
    """A store file cannot be read; the message names it."""


class UnknownItem(IndexError_, KeyError):
    """No item has this id."""


class ReadOnlyStore(IndexError_):
    """Writes are refused: the data directory is read-only or the disk is full."""


class DuplicateItem(IndexError_, ValueError):
    """One write names the same id twice: which of the two should win is the caller's to say."""
