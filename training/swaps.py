"""Hard negative captions for the fine-grained choice test (SugarCrepe-style, issue #14): a caption
with exactly one word swapped for another of the same kind taken from another caption of the split:
one noun, one attribute or colour, one number, or one relation. A swap is kept only when it changes
the meaning: the new word appears in none of the image's own captions and is no synonym of the old.

Word lists are written out here (no POS tagger is a dependency); they cover the nouns, attributes,
numbers and relations that occur most in Flickr8k/COCO captions."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

KINDS: dict[str, frozenset[str]] = {
    "noun": frozenset(
        """
            dog dogs man men woman women boy boys girl girls child children baby person people ball water grass
            snow beach street bike bicycle car horse cat shirt dress jacket hat field road rock rocks tree trees
            wall building city crowd table camera frisbee stick toy sand ocean wave waves pool river lake
            mountain hill hair face bench fence sidewalk stage guitar skateboard surfboard motorcycle truck bus
            boat ramp park stairs door window chair couch bed sheep cow bird player players team football
            basketball soccer helmet shorts pants sunglasses bag flag tent swing slide fountain puppy mouth
            leash
            """.split()  # noqa: SIM905 (a word list reads better as text)
    ),
    "attribute": frozenset(
        """
            black white brown red blue green yellow orange pink purple gray grey young old little small big
            large tall wet dirty muddy smiling happy blond
            """.split()  # noqa: SIM905 (a word list reads better as text)
    ),
    "number": frozenset(["two", "three", "four", "five", "six", "seven", "several", "many"]),
    "relation": frozenset(
        """
            on in under behind above near beside through into across over inside outside
            """.split()  # noqa: SIM905 (a word list reads better as text)
    ),
}

# Words that swap without changing what the caption says, in either direction.
SYNONYMS = [
    {"man", "person", "boy"},
    {"men", "people", "players"},
    {"woman", "person", "girl"},
    {"women", "people"},
    {"child", "boy", "girl", "baby", "person"},
    {"children", "boys", "girls", "people"},
    {"dog", "puppy"},
    {"bike", "bicycle"},
    {"ocean", "water", "beach", "wave", "waves"},
    {"lake", "river", "water", "pool"},
    {"rock", "rocks", "mountain", "hill"},
    {"street", "road", "sidewalk"},
    {"small", "little", "young"},
    {"big", "large", "tall"},
    {"gray", "grey"},
    {"wet", "muddy", "dirty"},
    {"smiling", "happy"},
    {"on", "over", "above", "across"},
    {"in", "into", "inside", "through"},
    {"near", "beside"},
    {"several", "many", "three", "four", "five", "six", "seven"},
    {"soccer", "football", "ball"},
]

WORD = re.compile(r"[A-Za-z]+")

# A noun swaps only for one of the same grammatical number, so the negative reads as English and the
# test is about content, not agreement ("Two men" -> "Two girls", never "Two girl").
PLURAL_NOUNS = frozenset(
    """
        dogs men women boys girls children people rocks trees waves players stairs shorts pants sunglasses
        """.split()  # noqa: SIM905 (a word list reads better as text)
)


def _synonyms(a: str, b: str) -> bool:
    return any(a in group and b in group for group in SYNONYMS)


@dataclass(frozen=True)
class Swap:
    image: int  # index of the image in the split
    kind: str
    positive: str
    negative: str
    old: str
    new: str


def swap_word(caption: str, old: str, new: str) -> str:
    """The caption with its first whole-word `old` (any case) replaced by `new` (same capitalisation)."""
    for m in WORD.finditer(caption):
        if m.group().lower() == old:
            word = new.capitalize() if m.group()[0].isupper() else new
            return caption[: m.start()] + word + caption[m.end() :]
    raise ValueError(f"{old!r} is not a word of {caption!r}")


def make_swaps(captions: list[list[str]], seed: int = 0) -> list[Swap]:
    """At most one swap per kind per image: the first of its captions that holds a word of that kind,
    and a replacement of the same kind drawn from the words other images' captions use."""
    rng = np.random.default_rng(seed)
    pools: dict[str, list[str]] = {}
    for kind, lexicon in KINDS.items():
        seen = {w.lower() for caps in captions for c in caps for w in WORD.findall(c) if w.lower() in lexicon}
        pools[kind] = sorted(seen)
    out = []
    for image, caps in enumerate(captions):
        own = {w.lower() for c in caps for w in WORD.findall(c)}
        for kind, lexicon in KINDS.items():
            for caption in caps:
                present = [w.lower() for w in WORD.findall(caption) if w.lower() in lexicon]
                if not present:
                    continue
                old = present[0]
                choices = [w for w in pools[kind] if w not in own and not _synonyms(old, w)]
                if kind == "noun":
                    choices = [w for w in choices if (w in PLURAL_NOUNS) == (old in PLURAL_NOUNS)]
                if not choices:
                    break
                new = choices[int(rng.integers(len(choices)))]
                out.append(Swap(image, kind, caption, swap_word(caption, old, new), old, new))
                break
    return out
