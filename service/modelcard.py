"""Read an exported model directory: `model.json` is the contract between training and serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
