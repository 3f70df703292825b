"""How a query is put to the index: a text's or an image's embedding -> `index.Query`.

A text becomes a query in two steps, with the text graph between them: the tokenizer's rows go to
whichever encoder the caller has (the service's micro-batcher, awaited in `service/routes/common.py`;
a direct call in `emkum search` and `emkum eval`, through `embed_text_queries`), and `text_queries`
pairs each embedding with its tokens. So a text query is always its CLS vector plus its word vectors
(the tokenizer's [CLS], [SEP] and padding masked out by the text graph's `token_mask`) labelled by
their token strings, and an image query is its CLS vector plus every patch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from index import Query
from runtime.encoders import ImageEmbedding, TextEmbedding
from runtime.tokenizer import TextTokenizer, TokenBatch

TokenRows = list[tuple[np.ndarray, np.ndarray]]


def text_queries(batch: TokenBatch, embeddings: list[TextEmbedding]) -> list[Query]:
    """The texts of `batch` as queries, given the text graph's output for `batch.rows()`."""
    return [Query(e.cls, e.tokens, e.mask, words) for e, words in zip(embeddings, batch.words, strict=True)]


def embed_text_queries(
    tokenizer: TextTokenizer,
    embed_rows: Callable[[TokenRows], list[TextEmbedding]],
    texts: list[str],
    chunk: int = 256,
) -> list[Query]:
    """Texts -> queries with a synchronous encoder call (`Encoders.embed_tokens_now`), `chunk` texts
    per call."""
    out: list[Query] = []
    for start in range(0, len(texts), chunk):
        batch = tokenizer(texts[start : start + chunk])
        out += text_queries(batch, embed_rows(batch.rows()))
    return out


def image_query(emb: ImageEmbedding) -> Query:
    """An image asks with all its patches (they play the words' part; labels are their indices)."""
    return Query(emb.cls, emb.patches, np.ones(len(emb.patches), dtype=np.float32))
