"""How often a collage tile's content word also names something in another tile of the same collage.

The collage pointing test (training/pointing.py, issue #14) counts a content word as right when its
best patch lies in its own caption's tile. But "dog", "man" or "grass" in one tile's caption often
names something another tile shows too (Flickr8k is mostly people and dogs), and a word's vector
alone cannot tell the two apart unless its sentence context does. This counts, over exactly the
collages and captions `emkum eval --half b` scores, the content words (the eval's WordPiece words and
stop-word list) that another tile's five captions also use, and the score of a pointer that knows
every concept perfectly but picks uniformly among the tiles naming it (mean 1/m over words named in
m tiles): a reference for what the 3x3 goal asks, not a bound (context can disambiguate).

    python benchmarks/collage_ambiguity.py    # writes benchmarks/results/collage_ambiguity.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, write_report  # noqa: E402
from runtime.modelcard import load_model_card  # noqa: E402
from runtime.tokenizer import TextTokenizer  # noqa: E402
from training.collage import collage_groups  # noqa: E402
from training.data import read_spec, select_half  # noqa: E402
from training.pointing import word_groups  # noqa: E402
from training.stopwords import is_content_word  # noqa: E402

DATA = "karpathy:{root}/dataset_flickr8k.json:{root}/images-val-*.tar:val"


def fold(word: str) -> str:
    """'dogs' and 'dog' name the same thing here."""
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def main() -> None:
    shared = ROOT.parent / "shared/data/flickr8k"
    if not shared.exists():
        raise SystemExit(f"{shared} is absent: this measures the Flickr8k val split")
    model = ROOT / "artifacts/emkum-flickr8k"
    card = load_model_card(model)
    tokenizer = TextTokenizer(model / card["files"]["tokenizer"], card["text"]["max_length"])
    pairs = select_half(read_spec(DATA.format(root=shared)), "b")

    def words(text: str) -> list[str]:
        return [w for w, _ in word_groups(tokenizer([text]).words[0]) if is_content_word(w)]

    report: dict = {"machine": describe(), "half": "b", "grids": {}}
    for g in (2, 3):
        shares, unique = [], 0
        groups = collage_groups(len(pairs), g)
        for group in groups:
            named = [{fold(w) for c in pairs[i].captions for w in words(c)} for i in group]
            for i in group:
                for w in words(pairs[i].captions[0]):  # the caption the eval scores
                    m = sum(fold(w) in tile for tile in named)  # its own tile included
                    shares.append(1 / m)
                    unique += m == 1
        report["grids"][f"{g}x{g}"] = {
            "collages": len(groups),
            "content_words": len(shares),
            "named_in_no_other_tile_pct": round(100 * unique / len(shares), 2),
            "uniform_among_tiles_naming_it_pct": round(100 * float(np.mean(shares)), 2),
            "chance_pct": round(100 / g**2, 2),
        }
    write_report(ROOT / "benchmarks/results/collage_ambiguity.json", report)


if __name__ == "__main__":
    main()
