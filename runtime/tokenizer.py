"""Caption tokenisation with the text encoder's own `tokenizer.json` (HF `tokenizers`, no torch).

Shared by training (so the model sees exactly what serving will send) and the service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass
class TokenBatch:
    ids: np.ndarray  # int64 [B, L]
    mask: np.ndarray  # int64 [B, L]
    truncated: list[bool]  # whether each text lost tokens to the length limit
    words: list[list[str]]  # the token strings, for `explain`

    def rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's (ids, mask) without its padding: what the text encoder takes per input."""
        lengths = self.mask.sum(axis=1)
        return [(self.ids[i, :n], self.mask[i, :n]) for i, n in enumerate(lengths)]


class TextTokenizer:
    def __init__(self, path: str | Path, max_length: int = 64) -> None:
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def __call__(self, texts: list[str], pad_to: int | None = None) -> TokenBatch:
        encodings = self.tokenizer.encode_batch(texts)
        lengths = [min(len(e.ids), self.max_length) for e in encodings]
        width = pad_to or max(lengths)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        truncated, words = [], []
        for i, enc in enumerate(encodings):
            tokens = list(enc.ids)
            strings = list(enc.tokens)
            cut = len(tokens) > self.max_length
            if cut:  # keep [CLS] ... and end with [SEP]
                tokens = [*tokens[: self.max_length - 1], tokens[-1]]
                strings = [*strings[: self.max_length - 1], strings[-1]]
            ids[i, : len(tokens)] = tokens
            mask[i, : len(tokens)] = 1
            truncated.append(cut)
            words.append(strings)
        return TokenBatch(ids=ids, mask=mask, truncated=truncated, words=words)
