"""Caption tokenisation with the text encoder's own `tokenizer.json` (HF `tokenizers`, no torch).

Shared by training (so the model sees exactly what serving will send) and the service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass
class TokenBatch:
    """Each text's token ids as the tokenizer made them, unpadded: the encoders pad a batch once, to
    its own longest row (runtime/encoders.py). Training stacks fixed-width matrices (`ids`, `mask`)."""

    token_ids: list[np.ndarray]  # int64 [L_i] per text, [CLS] ... [SEP]
    truncated: list[bool]  # whether each text lost tokens to the length limit
    words: list[list[str]]  # the token strings, for `explain`
    width: int  # the padded width of `ids` and `mask` (pad_to, or the longest text)

    def rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's (ids, mask), unpadded: what the text encoder takes per input."""
        return [(ids, np.ones_like(ids)) for ids in self.token_ids]

    @property
    def ids(self) -> np.ndarray:
        """int64 [B, width], zero-padded."""
        out = np.zeros((len(self.token_ids), self.width), dtype=np.int64)
        for i, row in enumerate(self.token_ids):
            out[i, : len(row)] = row
        return out

    @property
    def mask(self) -> np.ndarray:
        """int64 [B, width], 1 on real tokens."""
        out = np.zeros((len(self.token_ids), self.width), dtype=np.int64)
        for i, row in enumerate(self.token_ids):
            out[i, : len(row)] = 1
        return out


class TextTokenizer:
    def __init__(self, path: str | Path, max_length: int = 64) -> None:
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def __call__(self, texts: list[str], pad_to: int | None = None) -> TokenBatch:
        rows, truncated, words = [], [], []
        for enc in self.tokenizer.encode_batch(texts):
            tokens, strings = list(enc.ids), list(enc.tokens)
            cut = len(tokens) > self.max_length
            if cut:  # keep [CLS] ... and end with [SEP]
                tokens = [*tokens[: self.max_length - 1], tokens[-1]]
                strings = [*strings[: self.max_length - 1], strings[-1]]
            rows.append(np.asarray(tokens, dtype=np.int64))
            truncated.append(cut)
            words.append(strings)
        width = pad_to or max((len(r) for r in rows), default=0)
        return TokenBatch(token_ids=rows, truncated=truncated, words=words, width=width)
