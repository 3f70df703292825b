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
from runtime.images import preprocess  # noqa: E402
from runtime.query import embed_text_queries  # noqa: E402
from runtime.tokenizer import TextTokenizer  # noqa: E402
from service.cli import demo_images  # noqa: E402
from tests.test_default_model import COLLAGES, QUERIES  # noqa: E402
from training.collage import make_collage, patch_cells  # noqa: E402
from training.pointing import content_word_maps  # noqa: E402


def count(model: Path, card: dict, precision: str) -> dict:
    spec = card["image"]
    tokenizer = TextTokenizer(model / "tokenizer.json", card["text"]["max_length"])
    encoders = Encoders(model, card, providers="cpu", precision=precision)
    cells = patch_cells(spec["grid"], 2)
    hits, seen, misses = 0, 0, []
    try:
        for names in COLLAGES:
            photos = [np.asarray(Image.open(demo_images() / n).convert("RGB")) for n in names]
            collage = Image.fromarray(make_collage(photos, spec["size"]))
            (image,) = encoders.embed_images_now([preprocess(collage, spec["size"], spec["mean"], spec["std"])])
            for cell, query in enumerate(
                embed_text_queries(tokenizer, encoders.embed_tokens_now, [QUERIES[n] for n in names])
            ):
                words, maps = content_word_maps(query.vectors @ image.patches.T, query.labels)
                for word, heat in zip(words, maps, strict=True):
                    if word == "photo":
                        continue
                    seen += 1
                    hit = int(cells[heat.argmax()] == cell)
                    hits += hit
                    if not hit:
                        misses.append(f"{word} ({names[cell]})")
    finally:
        encoders.close()
    return {"precision": precision, "hits": hits, "words": seen, "misses": misses}


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
