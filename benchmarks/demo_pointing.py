"""Issue #14 on real photos: scikit-image's demo photos four to a 2x2 collage, a query naming each
("a photo of a cat"), and how many object words have their best patch (as `explain` computes it) in
their own photo's cell, per precision the model ships. The collages and queries are the ones
tests/test_default_model.py asserts on (>= 50%); this prints the counts.

    python benchmarks/demo_pointing.py --model artifacts/emkum-flickr8k
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import typer
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402
from runtime.encoders import Encoders  # noqa: E402
from runtime.tokenizer import TextTokenizer  # noqa: E402
from service.cli import demo_images  # noqa: E402
from tests.test_default_model import COLLAGES, QUERIES  # noqa: E402
from training.pointing import collage_word_hits  # noqa: E402


def count(model: Path, card: dict, precision: str) -> dict:
    tokenizer = TextTokenizer(model / "tokenizer.json", card["text"]["max_length"])
    encoders = Encoders(model, card, providers="cpu", precision=precision)
    photos = [[np.asarray(Image.open(demo_images() / n).convert("RGB")) for n in names] for names in COLLAGES]
    queries = [[QUERIES[n] for n in names] for names in COLLAGES]
    try:
        found = [
            (COLLAGES[k][cell], word, hit)
            for k, cell, word, hit in collage_word_hits(encoders, tokenizer, card["image"], photos, queries)
            if word != "photo"
        ]
    finally:
        encoders.close()
    misses = [f"{word} ({photo})" for photo, word, hit in found if not hit]
    return {"precision": precision, "hits": len(found) - len(misses), "words": len(found), "misses": misses}


def main(
    model: Path = typer.Option(ROOT / "artifacts" / "emkum-flickr8k", help="an exported model folder"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "demo_pointing.json"),
) -> None:
    card = json.loads((model / "model.json").read_text())
    precisions = ["fp32"] + (["int8"] if "image_int8" in card["files"] else [])
    rows = [count(model, card, p) for p in precisions]
    for row in rows:
        typer.echo(json.dumps(row))
    out.write_text(json.dumps({"machine": describe(), "model": str(model), "rows": rows}, indent=2))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
