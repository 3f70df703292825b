"""How a query is put to the index: a text's or an image's embedding -> `index.Query`. The route
(`service/routes/search.py`), `emkum search` and `emkum eval` build their queries here, so a text
query is its CLS vector plus its word vectors (the tokenizer's [CLS], [SEP] and padding masked out by
the text graph's `token_mask`), and an image query is its CLS vector plus every patch."""

from __future__ import annotations

import numpy as np

from index import Query
from runtime.encoders import ImageEmbedding, TextEmbedding


def text_query(emb: TextEmbedding, words: list[str] | None = None) -> Query:
    """`words`: the tokenizer's token strings for this text (labels for `explain`)."""
    return Query(emb.cls, emb.tokens, emb.mask, words)


def image_query(emb: ImageEmbedding) -> Query:
    """An image asks with all its patches (they play the words' part; labels are their indices)."""
    return Query(emb.cls, emb.patches, np.ones(len(emb.patches), dtype=np.float32))
