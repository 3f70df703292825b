"""Read an exported model directory: `model.json` is the contract between training and serving."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index import StoreConfig

SUPPORTED_FORMAT = 1


class ModelDirError(Exception):
    pass


def load_model_card(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise ModelDirError(
            f"{path} not found: build the default model with `emkum build-default` or export one with `emkum export`"
        )
    try:
        card = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelDirError(f"{path}: not valid JSON ({exc})") from exc
    if card.get("format_version") != SUPPORTED_FORMAT:
        raise ModelDirError(
            f"{path}: format_version {card.get('format_version')} (this service reads {SUPPORTED_FORMAT})"
        )
    for key in ("image", "text"):
        if not (Path(model_dir) / card["files"][key]).is_file():
            raise ModelDirError(f"{model_dir}: {card['files'][key]} is missing")
    return card


def cls_dim(card: dict[str, Any]) -> int:
    """The width of the model's CLS vectors: `cls_dim` where the card has one (a global vector that
    joins two, docs/model-card.md), else `dim`, the patch and word vectors' width."""
    return int(card.get("cls_dim", card["dim"]))


def store_config(card: dict[str, Any], **options: Any) -> StoreConfig:
    """The index configuration for this model: its vector sizes, name and patch grid, plus options
    (codec, pooling, CLS factory, ...). The store refuses a data directory written for another model."""
    return StoreConfig(
        dim=card["dim"], cls_dim=cls_dim(card), model=card["name"], patch_grid=card["image"]["grid"], **options
    )


@dataclass(frozen=True)
class RerankDefaults:
    """How this model reranks unless a request says otherwise."""

    candidates: int  # K: CLS candidates rescored with CMLI
    cls_weight: float  # final score = cls_weight * CLS + (1 - cls_weight) * CMLI


# what a card without a `rerank` section (exported by hand, or by an older version) gets; the
# export writes the same when training recorded no choice
DEFAULT_CANDIDATES, DEFAULT_CLS_WEIGHT = 20, 0.5


def rerank_defaults(card: dict[str, Any]) -> RerankDefaults:
    """The model's own K and score mix, chosen on val at export (model.json `rerank`)."""
    rerank = card.get("rerank", {})
    return RerankDefaults(
        candidates=int(rerank.get("candidates", DEFAULT_CANDIDATES)),
        cls_weight=float(rerank.get("cls_weight", DEFAULT_CLS_WEIGHT)),
    )
