"""The default model as `make demo` builds it: the committed trained tensors over the frozen parts
rebuilt from the pip packages, exported in fp32 and fp16, checked, and finding real photos by text.
Real weights, so end to end (the tiny random model covers everything else)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.encoders import Encoders
from runtime.images import preprocess
from runtime.query import embed_text_queries
from runtime.tokenizer import TextTokenizer
from service.cli import demo_images

pytestmark = pytest.mark.e2e

PHOTOS = ["rocket.jpg", "motorcycle_left.png", "chelsea.png", "coffee.png", "astronaut.png", "horse.png"]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "emkum-flickr8k"
    subprocess.run([sys.executable, "-m", "service.cli", "build-default", "--out-dir", str(out)], check=True)
    return out


def test_build_default_writes_both_variants_within_their_tolerances(default_model):
    card = json.loads((default_model / "model.json").read_text())
    assert card["name"] == "emkum-flickr8k" and card["dim"] == 256 and card["image"]["grid"] == 16
    assert all(err < 1e-4 for err in card["export"]["parity_relative_error"].values())
    assert all(err < 5e-3 for err in card["export"]["parity_relative_error_fp16"].values())
    assert card["metrics"]["val"]["cls"]["mean6"] == pytest.approx(61.54, abs=0.05)  # the CLS path as trained
    assert card["fine_grained"]["vision_layers"] == card["model_config"]["fine_grained"]["vision_layers"]
    assert (default_model / card["files"]["image_fp16"]).is_file()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_default_model_finds_real_photos_by_text(default_model, precision):
    card = json.loads((default_model / "model.json").read_text())
    spec = card["image"]
    pixels = [
        preprocess(Image.open(demo_images() / name).convert("RGB"), spec["size"], spec["mean"], spec["std"])
        for name in PHOTOS
    ]
    tokenizer = TextTokenizer(default_model / "tokenizer.json", card["text"]["max_length"])
    encoders = Encoders(default_model, card, providers="cpu", precision=precision)
    try:
        images = np.stack([e.cls for e in encoders.embed_images_now(pixels)])
        queries = {"a rocket launching into the sky": "rocket.jpg", "a man riding a motorcycle": "motorcycle_left.png"}
        texts = embed_text_queries(tokenizer, encoders.embed_tokens_now, list(queries))
    finally:
        encoders.close()
    for (query, expected), text in zip(queries.items(), texts, strict=True):
        assert PHOTOS[int(np.argmax(images @ text.cls))] == expected, query


QUERIES = {
    "chelsea.png": "a photo of a cat",
    "rocket.jpg": "a photo of a rocket",
    "coffee.png": "a photo of a coffee cup",
    "motorcycle_left.png": "a photo of a motorcycle",
    "astronaut.png": "a photo of a woman",
    "camera.png": "a photo of a man with a camera",
}
COLLAGES = [  # scikit-image's photos (horse.png is a silhouette, not a photo: left out)
    ["astronaut.png", "rocket.jpg", "coffee.png", "motorcycle_left.png"],
    ["chelsea.png", "rocket.jpg", "coffee.png", "motorcycle_left.png"],
    ["camera.png", "rocket.jpg", "coffee.png", "motorcycle_left.png"],
    ["motorcycle_left.png", "coffee.png", "rocket.jpg", "astronaut.png"],
]


def test_the_default_model_points_words_at_their_photos_in_collages(default_model):
    """Issue #14 on real photos: four photos in a 2x2 collage, a query naming each; the share of object
    words whose best patch (as `explain` computes it) lies in their own photo's cell. Chance is 25%.
    Measured when written: 14 of 21 words (67%); the model before the fine-grained head put every
    word of a collage in one cell, 7 of 21 (33%). "coffee cup" is the usual miss (rare in Flickr8k)."""
    from training.pointing import collage_word_hits

    card = json.loads((default_model / "model.json").read_text())
    tokenizer = TextTokenizer(default_model / "tokenizer.json", card["text"]["max_length"])
    encoders = Encoders(default_model, card, providers="cpu")
    photos = [[np.asarray(Image.open(demo_images() / n).convert("RGB")) for n in names] for names in COLLAGES]
    queries = [[QUERIES[n] for n in names] for names in COLLAGES]
    try:
        found = [
            hit
            for _, _, word, hit in collage_word_hits(encoders, tokenizer, card["image"], photos, queries)
            if word != "photo"
        ]
    finally:
        encoders.close()
    hits, words_seen = sum(found), len(found)
    assert words_seen == 21
    assert hits / words_seen >= 0.5, f"{hits} of {words_seen} object words in their photo's cell"


FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def test_the_default_model_points_object_words_inside_their_boxes_on_real_photos(default_model, tmp_path):
    """Issue #14's held-out check, on the photos of val half b with hand-drawn boxes (nothing was tuned
    on that half): "a photo of a <object>", the object word's best stored patch inside the object.
    Measured when written: 65.5% of 113 objects, chance 27.4% (the share of patches inside the boxes);
    58.6% of the 29 small ones (under a tenth of the photo), chance 6.3%."""
    from index import VectorStore
    from index.store import ItemInput
    from runtime.images import decode_square, normalize
    from runtime.modelcard import store_config
    from training.box_pointing import load_boxes
    from training.data import read_spec
    from training.eval_exported import photo_box_pointing

    if not (FLICKR8K / "dataset_flickr8k.json").is_file():
        pytest.skip(f"Flickr8k is not at {FLICKR8K} (the repository's ../shared): this test reads its val photos")
    wanted = {o.file for o in load_boxes()[1] if o.half == "b"}
    spec = f"karpathy:{FLICKR8K}/dataset_flickr8k.json:{FLICKR8K}/images-val-*.tar:val"
    pairs = [p for p in read_spec(spec) if p.key in wanted]
    card = json.loads((default_model / "model.json").read_text())
    tokenizer = TextTokenizer(default_model / "tokenizer.json", card["text"]["max_length"])
    encoders = Encoders(default_model, card, providers="cpu", precision="fp32")
    store = VectorStore(tmp_path / "index", store_config(card, use_gpu=False))
    try:
        size, mean, std = card["image"]["size"], card["image"]["mean"], card["image"]["std"]
        pixels = [normalize(decode_square(p.read(), size, p.key), mean, std) for p in pairs]
        store.add([ItemInput(str(i), e.cls, e.patches) for i, e in enumerate(encoders.embed_images_now(pixels))])
        result = photo_box_pointing(encoders, tokenizer, store, pairs)
    finally:
        encoders.close()
        store.close()
    assert result["objects"] == len(wanted) >= 100
    assert result["word_in_box"] >= 55.0 and result["word_in_box"] >= result["chance"] + 25, result
    assert result["small"]["word_in_box"] >= 40.0, result  # the held-out set's goal, on its kind of object
