"""The runtime's one error: an input it will not take, with a stable code and a message naming the
problem. It knows nothing of HTTP; service/errors.py gives each code its status (a bulk indexer
reports and skips the file, `emkum eval` stops on it)."""

from __future__ import annotations


class InputError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
