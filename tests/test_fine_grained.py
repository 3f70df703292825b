"""The fine-grained channel's pieces (issue #14), each on a case whose answer is built in: collages,
the pointing tally, the swapped-word negatives, the val halves, the fine-grained head in the model
and its export, and the head trainer learning to point on synthetic features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import InitRecipe, build_model, load_checkpoint, save_checkpoint
from model.config import FineGrainedConfig, load_config
from training.box_pointing import BoxedObject, BoxTally, box_pointing, load_boxes, patches_inside
from training.collage import cell_blocks, cell_edges, collage_groups, make_collage, patch_cells
from training.data import Pair, half_of, select_half
from training.pointing import PointingTally, common_share, patch_locality, word_groups
from training.swaps import KINDS, PLURAL_NOUNS, make_swaps, swap_word


def test_collage_puts_each_image_in_its_cell_and_patches_know_their_cell():
    colours = [np.full((10, 10, 3), c, dtype=np.uint8) for c in (10, 80, 160, 240)]
    collage = make_collage(colours, 32)
    assert collage.shape == (32, 32, 3)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert (collage[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] == colours[i][0, 0]).all()
    np.testing.assert_array_equal(patch_cells(4, 2), [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
    # 3x3 on the default model's 16 x 16 patches of 14 px: each patch's centre pixel lies in its cell
    edges = cell_edges(224, 3)
    centre = 14 * np.arange(16) + 7
    row_cell = np.searchsorted(edges, centre, side="right") - 1
    np.testing.assert_array_equal(patch_cells(16, 3), (row_cell[:, None] * 3 + row_cell[None, :]).ravel())
    with pytest.raises(ValueError, match="square number"):
        make_collage(colours[:3], 32)
    groups = collage_groups(10, 2)
    assert groups.shape == (2, 4) and len(set(groups.ravel())) == 8


def test_pointing_tally_counts_a_built_in_answer_and_sees_an_inverted_map():
    tokens = ["[CLS]", "a", "skate", "##board", "on", "the", "grass", "[SEP]"]
    assert [w for w, _ in word_groups(tokens)] == ["a", "skateboard", "on", "the", "grass"]
    cells = patch_cells(4, 2)  # 16 patches, 4 per cell
    word_mask = np.array([0, 1, 1, 1, 1, 1, 1, 0], dtype=np.float32)
    sim = np.zeros((8, 16), dtype=np.float32)
    sim[:, cells == 3] = 0.5  # every token likes cell 3 best, the caption's own cell
    right, wrong = PointingTally(), PointingTally()
    right.add(sim, tokens, word_mask, cells, cell=3)
    wrong.add(sim, tokens, word_mask, cells, cell=0)
    assert right.summary()["words"] == 2  # skateboard, grass: the content words
    assert right.summary()["word_pointing"] == 100.0 and right.summary()["caption_cell"] == 100.0
    assert wrong.summary()["word_pointing"] == 0.0 and wrong.summary()["caption_cell"] == 0.0
    assert right.summary()["cell_contrast"] > 0 > wrong.summary()["cell_contrast"]  # inverted map


def test_a_box_holds_the_patches_whose_centres_lie_inside_it():
    inside = patches_inside(((0.0, 0.0, 0.5, 1.0),), 4).reshape(4, 4)  # the left half
    assert inside[:, :2].all() and not inside[:, 2:].any()
    # two instances: the union; a box around one patch centre holds that patch only
    two = patches_inside(((0.0, 0.0, 0.25, 0.25), (0.55, 0.55, 0.7, 0.7)), 4).reshape(4, 4)
    assert two.sum() == 2 and two[0, 0] and two[2, 2]


def test_the_box_tally_counts_a_built_in_answer_and_reports_chance_and_small_objects():
    tally = BoxTally()
    heat = np.zeros(16, dtype=np.float32)
    heat[5] = 1.0  # row 1, column 1 of a 4 x 4 grid: centre (0.375, 0.375)
    assert tally.add(heat, ((0.25, 0.25, 0.5, 0.5),))  # holds that centre: a hit
    assert not tally.add(heat, ((0.5, 0.5, 1.0, 1.0),))  # the bottom-right quarter: a miss
    s = tally.summary()
    assert s["objects"] == 2 and s["word_in_box"] == 50.0
    assert s["chance"] == pytest.approx(100 * (1 / 16 + 4 / 16) / 2, abs=0.01)
    assert s["small"] == {"word_in_box": 100.0, "chance": 6.25, "objects": 1}  # only the 1-patch box is small


def test_box_pointing_scores_the_object_words_map_not_the_templates():
    """A photo whose dog patches equal the word "dog": hit; the same word over a photo where only the
    background matches it: miss. The template's other words ("photo") do not count."""
    grid, d = 4, 4
    dog = np.eye(d)[0]
    patches = {"hit.jpg": np.tile(np.eye(d)[1], (grid * grid, 1)), "miss.jpg": np.tile(np.eye(d)[1], (16, 1))}
    patches["hit.jpg"][[5, 6, 9, 10]] = dog  # the centre 2 x 2 patches
    patches["miss.jpg"][[0, 3]] = dog  # corners, outside the box
    box = ((0.25, 0.25, 0.75, 0.75),)
    objects = [BoxedObject("hit.jpg", "b", "dog", box), BoxedObject("miss.jpg", "b", "dog", box)]

    def embed(texts):
        assert texts == ["a photo of a dog"] * 2
        labels = ["[CLS]", "a", "photo", "of", "a", "dog", "[SEP]"]
        vectors = np.tile(np.eye(d)[1], (len(labels), 1))  # every other token likes the background
        vectors[5] = dog
        return [(vectors, labels)] * len(texts)

    s = box_pointing(patches, embed, objects, "a photo of a {}")
    assert s["objects"] == 2 and s["word_in_box"] == 50.0 and s["chance"] == 25.0


def test_the_hand_drawn_boxes_cover_both_val_halves_with_valid_boxes_and_content_words():
    from training.stopwords import is_content_word

    template, objects = load_boxes()
    assert template == "a photo of a {}"
    assert all(o.half == half_of(o.file) for o in objects)  # the halves the other measures use
    assert min(sum(o.half == h for o in objects) for h in "ab") >= 100
    assert len({o.file for o in objects}) == len(objects)
    assert all(is_content_word(o.word) and o.boxes for o in objects)


def test_a_box_outside_the_picture_is_refused_by_name(tmp_path):
    bad = tmp_path / "boxes.json"
    outside = {"file": "x.jpg", "half": "a", "word": "dog", "boxes": [[0.5, 0, 1.2, 1]]}
    bad.write_text(json.dumps({"template": "{}", "objects": [outside]}))
    with pytest.raises(ValueError, match=r"x\.jpg"):
        load_boxes(bad)


def test_locality_and_common_share_on_vectors_with_known_structure(rng):
    cells = patch_cells(4, 2)
    local = np.eye(4)[cells] + 0.01 * rng.normal(size=(16, 4))  # each cell its own direction
    assert patch_locality(local, cells, neighbours=3) == 1.0
    assert common_share(np.ones((16, 4))) == pytest.approx(1.0)
    assert common_share(local) == pytest.approx(0.25, abs=0.02)  # four orthogonal directions


def test_swaps_change_one_word_to_another_of_its_kind_that_the_image_never_mentions():
    captions = [
        ["A black dog runs on the grass .", "A dog in a field ."],
        ["Two men play soccer on a beach .", "Men playing with a ball ."],
        ["A girl in a red dress sits under a tree .", "A child in red ."],
        ["Three women walk in the snow .", "Women in white coats ."],
    ]
    swaps = make_swaps(captions, seed=0)
    assert {s.kind for s in swaps} == set(KINDS)
    for s in swaps:
        before, after = s.positive.split(), s.negative.split()
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changed) == 1 and changed[0][0].lower() == s.old and changed[0][1].lower() == s.new
        assert s.new in KINDS[s.kind] and s.old in KINDS[s.kind]
        own = {w.lower().strip(".") for c in captions[s.image] for w in c.split()}
        assert s.new not in own  # the swap must change what the caption says about this image
        if s.kind == "noun":
            assert (s.old in PLURAL_NOUNS) == (s.new in PLURAL_NOUNS)
    assert swap_word("Dogs and a dog", "dogs", "cats") == "Cats and a dog"
    # a swap is skipped when every candidate is a synonym or already in the image's captions
    assert not [s for s in make_swaps([["A man ."], ["A person ."]]) if s.kind == "noun" and s.image == 0]


def test_val_halves_are_fixed_disjoint_and_cover_the_split():
    pairs = [Pair(f"img{i}.jpg", ["c"], lambda: b"") for i in range(400)]
    a, b = select_half(pairs, "a"), select_half(pairs, "b")
    assert len(a) + len(b) == 400 and not {p.key for p in a} & {p.key for p in b}
    assert 150 < len(a) < 250
    assert [half_of(p.key) for p in a] == ["a"] * len(a)
    assert select_half(pairs, "all") == pairs
    with pytest.raises(ValueError, match="half"):
        select_half(pairs, "c")


def _tiny(fine_grained: FineGrainedConfig | None, init: InitRecipe | None = None):
    cfg = load_config("emkum-tiny")
    cfg.fine_grained = fine_grained
    return build_model(cfg, init or InitRecipe(), seed=0).eval()


def test_fine_grained_head_replaces_patches_and_tokens_but_not_the_cls_path():
    plain = _tiny(None)
    fg = _tiny(FineGrainedConfig(vision_layers=(1, 2), hidden=8))
    fg.load_state_dict(plain.state_dict(), strict=False)  # same towers, block and projections
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[101, 2000, 3000, 102], [101, 2500, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a, b = plain.encode_image(pixels), fg.encode_image(pixels)
        ta, tb = plain.encode_text(ids, mask), fg.encode_text(ids, mask)
    torch.testing.assert_close(a.cls, b.cls)
    torch.testing.assert_close(ta.cls, tb.cls)
    torch.testing.assert_close(tb.tokens[:, 0], tb.cls)  # position 0 stays the CLS vector
    assert not torch.allclose(a.patches, b.patches) and not torch.allclose(ta.tokens[:, 1:], tb.tokens[:, 1:])
    torch.testing.assert_close(b.patches.norm(dim=-1), torch.ones(2, 16))
    with torch.no_grad():  # the head reads blocks 1 and 2, each through its own LayerNorm
        _, kept = fg.vision.forward_layers(pixels, None, (1, 2))
        torch.testing.assert_close(b.patches, fg.fg_image(kept[1][:, 1:], kept[2][:, 1:]))
        assert not torch.allclose(kept[1], kept[2])
    with pytest.raises(ValueError, match="vision_layers"):
        _tiny(FineGrainedConfig(vision_layers=(9,)))


def test_caption_context_adds_the_captions_mean_word_and_ignores_what_is_not_a_word():
    """FineGrainedHead(caption_context=b): each vector + b x the mean of its caption's word vectors,
    renormalised; padding and [SEP] (not words) change nothing; b = 0 is the plain head."""
    from model.emkum import FineGrainedHead

    torch.manual_seed(0)
    plain = FineGrainedHead((8,), 16, 0)
    lean = FineGrainedHead((8,), 16, 0, caption_context=0.5)
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 8)
    words = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    y = plain(x)
    mean = (y * words[..., None]).sum(1, keepdim=True) / words.sum(1, keepdim=True)[..., None]
    torch.testing.assert_close(lean(x, words=words), torch.nn.functional.normalize(y + 0.5 * mean, dim=-1))
    padded = x.clone()
    padded[:, 3:] = torch.randn(2, 2, 8) * 100  # whatever sits where there are no words
    torch.testing.assert_close(lean(padded, words=words)[:, :2], lean(x, words=words)[:, :2])
    torch.testing.assert_close(plain(x, words=words), y)
    with pytest.raises(ValueError, match="word mask"):
        lean(x)


def test_a_model_with_the_head_saves_loads_and_exports_with_parity(tmp_path):
    from training.export import export

    config = FineGrainedConfig(vision_layers=(2,), hidden=0, context=3, attention=1, caption_context=0.5)
    model = _tiny(config)
    torch.nn.init.normal_(model.fg_image.context.weight)  # not zero, so parity covers the conv
    save_checkpoint(tmp_path / "fg.safetensors", model, InitRecipe(), seed=0)
    again, header = load_checkpoint(tmp_path / "fg.safetensors")
    assert header["config"].fine_grained == config
    torch.testing.assert_close(again.fg_text.proj.weight, model.fg_text.proj.weight)
    card = export(tmp_path / "fg.safetensors", tmp_path / "out", fp16=False)
    assert all(err < 1e-4 for err in card["export"]["parity_relative_error"].values())
    written = json.loads((tmp_path / "out" / "model.json").read_text())
    assert written["model_config"]["fine_grained"] == {
        "vision_layers": [2],
        "hidden": 0,
        "context": 3,
        "attention": 1,
        "caption_context": 0.5,
        "cnn": "none",
        "second_opinion": 0.0,
    }
    assert written["fine_grained"]["vision_layers"] == [2]


def test_the_second_tower_feeds_the_patches_only_and_comes_back_from_its_package(tmp_path):
    """fine_grained.cnn = 'efficientnet-lite0': the patch head reads the ConvNet's maps after the
    blocks (patches change with them, the CLS path does not); a partial checkpoint ships no ConvNet
    tensor and gets the package's weights back from its init recipe; the export keeps parity."""
    from model import pretrained
    from training.export import export

    config = FineGrainedConfig(vision_layers=(2,), context=3, cnn="efficientnet-lite0")
    model = _tiny(config, InitRecipe(cnn="efficientnet-lite0"))
    assert model.fg_image.proj.in_features == 32 + 112 + 1280  # block 2, then both maps
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.encode_image(pixels)
        _, kept = model.vision.forward_layers(pixels, None, (2,))
        where, what = model.cnn(pixels)
        torch.testing.assert_close(out.patches, model.fg_image(kept[2][:, 1:], where, what))
        assert where.shape == (2, 16, 112) and what.shape == (2, 16, 1280)  # the tiny ViT's 4 x 4 grid
        before = out.cls.clone(), out.patches.clone()
        model.cnn.net.conv_head.weight.mul_(-1)  # another ConvNet: other patches, the same CLS
        changed = model.encode_image(pixels)
        torch.testing.assert_close(changed.cls, before[0])
        assert not torch.allclose(changed.patches, before[1])
        model.cnn.net.conv_head.weight.mul_(-1)
    fg_names = {k for k in model.state_dict() if k.startswith(("fg_image.", "fg_text."))}
    save_checkpoint(tmp_path / "p.safetensors", model, InitRecipe(cnn="efficientnet-lite0"), 0, only=fg_names)
    again, header = load_checkpoint(tmp_path / "p.safetensors")
    assert header["init"].cnn == "efficientnet-lite0" and header["config"].fine_grained == config
    reference = pretrained.efficientnet_lite_state("efficientnet-lite0")["conv_head.weight"]
    torch.testing.assert_close(again.cnn.net.conv_head.weight, reference)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels).patches, before[1])
    card = export(tmp_path / "p.safetensors", tmp_path / "out", fp16=False)
    assert all(err < 1e-4 for err in card["export"]["parity_relative_error"].values())
    written = json.loads((tmp_path / "out" / "model.json").read_text())
    assert written["model_config"]["fine_grained"]["cnn"] == "efficientnet-lite0"
    with pytest.raises(ValueError, match="unknown fine_grained cnn"):
        _tiny(FineGrainedConfig(vision_layers=(2,), cnn="resnet"))


CONCEPTS = ["dog", "car", "tree", "boat"]


def synthetic_cache(folder, rng, n_images: int = 256, width: int = 8, twin_cls: bool = False, in_cnn: bool = False):
    """A feature cache in training/feature_cache.py's layout where the answer is known: image i shows
    concept i % 4 in all its 16 patches, its captions name it ("a dog"), text features carry the
    concept in another (rotated) basis, and each 2x2 collage holds four different concepts.
    `twin_cls`: images 2j and 2j + 1 (different concepts) share one CLS vector, so CLS cannot tell
    them apart and only the patches can. `in_cnn`: the concept is only in the second tower's first map
    (model/cnn.py's EfficientNet-Lite0 widths); the tower block and the second map are noise."""
    from model.pretrained import minilm_dir
    from runtime.tokenizer import TextTokenizer

    folder.mkdir(parents=True)
    concept = np.arange(n_images) % 4
    basis = np.eye(width)[:4]
    rotation, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(width, width)))  # one 'language' for all splits

    def noisy(x):
        return (x + 0.1 * rng.normal(size=x.shape)).astype(np.float16)

    groups = np.stack([rng.permutation(np.arange(4 * j, 4 * j + 4)) for j in range(n_images // 4)])
    cells = patch_cells(4, 2)
    single = np.repeat(basis[concept][:, None, :], 16, axis=1)
    collage = basis[concept[groups]][:, cells, :]
    if in_cnn:
        for prefix, x in (("single", single), ("collage2", collage)):
            np.save(folder / f"{prefix}_efficientnet-lite0_0.npy", noisy(np.pad(x, ((0, 0), (0, 0), (0, 112 - width)))))
            np.save(folder / f"{prefix}_efficientnet-lite0_1.npy", noisy(np.zeros((*x.shape[:2], 1280))))
        single, collage = np.zeros_like(single), np.zeros_like(collage)
    np.save(folder / "single_block1.npy", noisy(single))
    np.save(folder / "collage2_block1.npy", noisy(collage))
    np.save(folder / "collage2_images.npy", groups)
    captions = [f"a {CONCEPTS[c]}" for c in concept for _ in range(2)]
    batch = TextTokenizer(minilm_dir() / "tokenizer.json")(captions)  # [CLS] a <concept> [SEP]
    assert batch.ids.shape[1] == 4
    tokens = rng.normal(size=(len(captions), 40, width)) * 0.1
    tokens[:, 2] += (basis[np.repeat(concept, 2)]) @ rotation
    tokens[:, :2] += np.eye(width)[[5, 6]] @ rotation  # [CLS] and "a": one fixed direction each, no concept
    np.save(folder / "text_tokens.npy", tokens.astype(np.float16))
    word = np.zeros((len(captions), 40), dtype=np.float32)
    word[:, 1:3] = 1
    content = np.zeros_like(word)
    content[:, 2] = 1
    np.save(folder / "text_word_mask.npy", word)
    np.save(folder / "text_content_mask.npy", content)
    np.save(folder / "caption_image.npy", np.repeat(np.arange(n_images), 2))
    # one swap per image: its first caption with the concept word replaced by the next concept's
    swapped = (concept + 1) % 4
    swap_tokens = rng.normal(size=(n_images, 40, width)) * 0.1
    swap_tokens[:, 2] += basis[swapped] @ rotation
    swap_tokens[:, :2] += np.eye(width)[[5, 6]] @ rotation
    np.save(folder / "swap_tokens.npy", swap_tokens.astype(np.float16))
    np.save(folder / "swap_word_mask.npy", word[::2])
    np.save(folder / "swap_content_mask.npy", content[::2])
    np.save(folder / "swap_image.npy", np.arange(n_images))
    np.save(folder / "swap_positive.npy", 2 * np.arange(n_images))
    np.save(folder / "swap_kind.npy", np.array(["noun"] * n_images))
    swap_cls = rng.normal(size=(n_images, 16)).astype(np.float32)
    np.save(folder / "swap_cls.npy", swap_cls / np.linalg.norm(swap_cls, axis=1, keepdims=True))
    cls = rng.normal(size=(n_images, 16)).astype(np.float32)
    if twin_cls:
        cls[1::2] = cls[::2]
    np.save(folder / "single_cls.npy", cls / np.linalg.norm(cls, axis=1, keepdims=True))
    np.save(folder / "text_cls.npy", np.repeat(cls / np.linalg.norm(cls, axis=1, keepdims=True), 2, axis=0))
    meta = {
        "layers": [1],
        "dim": 16,
        "images": n_images,
        "captions": len(captions),
        "keys": [str(i) for i in range(n_images)],
    }
    (folder / "meta.json").write_text(json.dumps({**meta, "captions_text": captions}))


def test_the_head_trainer_learns_to_point_on_features_with_a_known_answer(tmp_path, rng):
    from training.feature_cache import SplitFeatures
    from training.fine_grained import FineGrainedTrainConfig, Heads, evaluate_heads, train_heads

    synthetic_cache(tmp_path / "train", rng)
    synthetic_cache(tmp_path / "val", np.random.default_rng(99))
    train, val = SplitFeatures.load(tmp_path / "train"), SplitFeatures.load(tmp_path / "val")
    cfg = FineGrainedTrainConfig(layers=(1,), epochs=8, batch=32, collage_batch=16, lr=1e-2, candidates=8)
    torch.manual_seed(0)
    before = evaluate_heads(Heads((8,), 8, 16, 0), val, cfg)
    heads, history = train_heads(train, val, cfg)
    assert [row["epoch"] for row in history] == list(range(1, 9))  # a fresh head: no epoch-0 row
    after = history[-1]
    assert after["pointing2"] >= 98 and after["cell2"] >= 98, after
    assert before["pointing2"] < 60, before  # an untrained head points near chance (25%)
    assert after["choice_cmli"] >= 98 and before["choice_cmli"] < 75, (before, after)  # "a dog" beats "a car"
    assert after == {**after, **evaluate_heads(heads, val, cfg)}  # the history is the evaluation


def test_the_head_trainer_reads_the_second_towers_maps_when_asked(tmp_path, rng):
    """On a cache where only the second tower's maps show the concept, a head told to read them
    (train.cnn) learns to point; one that reads the tower block alone cannot."""
    from training.feature_cache import SplitFeatures
    from training.fine_grained import FineGrainedTrainConfig, train_heads

    synthetic_cache(tmp_path / "train", rng, in_cnn=True)
    synthetic_cache(tmp_path / "val", np.random.default_rng(99), in_cnn=True)
    train, val = SplitFeatures.load(tmp_path / "train"), SplitFeatures.load(tmp_path / "val")
    cfg = FineGrainedTrainConfig(layers=(1,), epochs=6, batch=32, collage_batch=16, lr=1e-2, candidates=8)
    torch.manual_seed(0)
    with_cnn = train_heads(train, val, cfg.model_copy(update={"cnn": "efficientnet-lite0"}))[1][-1]
    without = train_heads(train, val, cfg)[1][-1]
    assert with_cnn["pointing2"] >= 95 and with_cnn["choice_cmli"] >= 95, with_cnn
    assert without["pointing2"] < 60, without  # chance is 25%


def test_the_first_stage_keeps_the_true_match_among_the_candidates(tmp_path, rng):
    from training.feature_cache import SplitFeatures
    from training.fine_grained import first_stage

    synthetic_cache(tmp_path / "c", rng, n_images=64)
    feats = SplitFeatures.load(tmp_path / "c")
    cls = np.load(tmp_path / "c" / "single_cls.npy")
    text = cls[np.repeat(np.arange(64), 2)]
    text[0] = -cls[0]  # caption 0 is CLS's worst match for its own image 0
    np.save(tmp_path / "c" / "text_cls.npy", text)
    stage = first_stage(feats, 8)
    assert stage.t2i.shape == (128, 8) and stage.i2t.shape == (64, 8)
    assert (stage.t2i == np.repeat(np.arange(64), 2)[:, None]).any(1).all()  # every caption's image is there
    assert stage.t2i[0, -1] == 0 and stage.t2i_cls[0, -1] == pytest.approx(-1.0, abs=1e-5)  # put in last
    assert stage.t2i[1, 0] == 0 and stage.t2i_cls[1, 0] == pytest.approx(1.0, abs=1e-5)  # CLS's own best first
    assert (stage.caption_image[stage.i2t] == np.arange(64)[:, None]).any(1).all()  # every image, a caption


def test_the_rerank_term_alone_teaches_cmli_what_cls_cannot_tell(tmp_path, rng):
    """Twin images share one CLS vector and show different concepts: CLS ranks them by a coin flip,
    and only a CMLI trained by the rerank term (no other objective) breaks the ties."""
    from training.feature_cache import SplitFeatures
    from training.fine_grained import FineGrainedTrainConfig, Heads, evaluate_heads, train_heads

    synthetic_cache(tmp_path / "train", rng, twin_cls=True)
    synthetic_cache(tmp_path / "val", np.random.default_rng(99), twin_cls=True)
    train, val = SplitFeatures.load(tmp_path / "train"), SplitFeatures.load(tmp_path / "val")
    off = {"filip": 0.0, "cell": 0.0, "word": 0.0, "swap": 0.0}
    cfg = FineGrainedTrainConfig(layers=(1,), epochs=8, batch=32, lr=1e-2, candidates=8, rerank=1.0, **off)
    cfg = cfg.model_copy(update={"rerank_candidates": 8, "rerank_queries": 32, "rerank_weight": 0.5})
    torch.manual_seed(0)
    before = evaluate_heads(Heads((8,), 8, 16, 0), val, cfg)
    _, history = train_heads(train, val, cfg)
    after = history[-1]
    assert after["rerank_mean6"] >= after["cls_mean6"] + 10, after  # the twins are told apart
    assert before["rerank_mean6"] < after["rerank_mean6"] - 5, (before, after)


def test_training_can_continue_from_a_checkpoints_own_head(tmp_path, rng):
    """train.init = 'checkpoint': epoch 0 of the history is the given head as it was (it points
    perfectly on the known-answer cache), not a fresh one (which points near chance)."""
    from types import SimpleNamespace

    from training.feature_cache import SplitFeatures
    from training.fine_grained import FineGrainedTrainConfig, train_heads

    synthetic_cache(tmp_path / "train", rng)
    synthetic_cache(tmp_path / "val", np.random.default_rng(99))
    train, val = SplitFeatures.load(tmp_path / "train"), SplitFeatures.load(tmp_path / "val")
    cfg = FineGrainedTrainConfig(layers=(1,), epochs=8, batch=32, collage_batch=16, lr=1e-2, candidates=8)
    torch.manual_seed(0)
    trained, _ = train_heads(train, val, cfg)
    start = SimpleNamespace(fg_image=trained.image, fg_text=trained.text)  # what a checkpoint's model carries
    _, history = train_heads(train, val, cfg.model_copy(update={"epochs": 1, "lr": 1e-6}), start=start)
    assert [row["epoch"] for row in history] == [0, 1]
    assert history[0]["pointing2"] >= 98 and history[1]["pointing2"] >= 98, history
    # a head may gain attention blocks (fresh) on top of the checkpoint's; other shapes are refused
    grown = cfg.model_copy(update={"epochs": 1, "lr": 1e-6, "attention": 1})
    assert train_heads(train, None, grown, start=start)[1] == [{"epoch": 1, "seconds": pytest.approx(0, abs=60)}]
    with pytest.raises(ValueError, match="does not fit"):
        train_heads(train, None, cfg.model_copy(update={"context": 0}), start=start)
    # epochs = 0: the checkpoint's head as it is, evaluated (how a new caption_context is given to it)
    _, history = train_heads(train, val, cfg.model_copy(update={"epochs": 0, "caption_context": 1.0}), start=start)
    assert [row["epoch"] for row in history] == [0] and history[0]["pointing2"] >= 98, history
    with pytest.raises(ValueError, match="has a fine-grained head"):
        train_heads(train, val, cfg, start=SimpleNamespace(fg_image=None, fg_text=None))


@pytest.mark.parametrize(("grid", "g"), [(16, 2), (16, 3), (4, 2)])
def test_cell_blocks_are_the_cells_patch_cells_assigns(grid, g):
    owner = np.full((grid, grid), -1)
    for k, (rows, cols) in enumerate(cell_blocks(grid, g)):
        assert (owner[rows, cols] == -1).all()  # no patch in two cells
        owner[rows, cols] = k
    np.testing.assert_array_equal(owner.reshape(-1), patch_cells(grid, g))


def test_the_tile_term_is_near_zero_where_each_cell_shows_its_tile_and_high_where_it_does_not(tmp_path, rng):
    """On the known-answer cache each collage cell holds its tile's concept and a tile alone shows
    it everywhere: any per-patch head maps a cell's patches onto its tile's, and onto another tile's
    only by chance."""
    from training.feature_cache import SplitFeatures
    from training.fine_grained import Heads, _rows, load_cache, tile_loss

    synthetic_cache(tmp_path / "train", rng)
    cache = load_cache(SplitFeatures.load(tmp_path / "train"), (1,))
    torch.manual_seed(0)
    heads = Heads((8,), 8, 16, 0)
    idx = np.arange(32)
    with torch.no_grad():
        patches = heads.image(*(_rows(a, idx) for a in cache["collage2"]))
        right = float(tile_loss(heads, cache, 2, idx, patches))
        cache["collage2_images"] = cache["collage2_images"][:, ::-1]  # every cell now names another concept's tile
        wrong = float(tile_loss(heads, cache, 2, idx, patches))
    assert right < 0.05 and wrong > 0.3, (right, wrong)


def test_the_tile_term_trains_with_the_others_and_keeps_the_known_answer(tmp_path, rng):
    from training.feature_cache import SplitFeatures
    from training.fine_grained import FineGrainedTrainConfig, train_heads

    synthetic_cache(tmp_path / "train", rng)
    synthetic_cache(tmp_path / "val", np.random.default_rng(99))
    train, val = SplitFeatures.load(tmp_path / "train"), SplitFeatures.load(tmp_path / "val")
    cfg = FineGrainedTrainConfig(layers=(1,), epochs=8, batch=32, collage_batch=16, lr=1e-2, candidates=8, tile=1.0)
    torch.manual_seed(0)
    _, history = train_heads(train, val, cfg)
    assert history[-1]["pointing2"] >= 98, history[-1]


def test_heads_go_into_the_model_they_were_trained_for(rng):
    from training.fine_grained import FineGrainedTrainConfig, Heads, heads_into_model

    plain = _tiny(None)
    heads = Heads((plain.cfg.vision.width,), plain.cfg.text.width, plain.cfg.proj_dim, 0, context=3)
    with torch.no_grad():
        heads.image.proj.weight.normal_()
    merged = heads_into_model(plain, heads, FineGrainedTrainConfig(layers=(2,)))
    assert merged.cfg.fine_grained == FineGrainedConfig(vision_layers=(2,), hidden=0, context=3)
    assert plain.cfg.fine_grained is None  # the original is left as it was
    torch.testing.assert_close(merged.fg_image.proj.weight, heads.image.proj.weight)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(pixels).cls, plain.encode_image(pixels).cls)


def test_hard_batches_group_each_image_with_its_cls_neighbours_and_use_every_image_once(rng):
    from training.fine_grained import hard_batches

    centres = np.eye(16)  # 16 tight clusters of 4 images: each image's 3 nearest are its cluster mates
    cls = np.repeat(centres, 4, axis=0) + 0.01 * rng.normal(size=(64, 16))
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    batches = hard_batches(cls, batch=16, group=4, rng=rng)
    flat = np.concatenate(batches)
    assert len(batches) == 4 and sorted(flat.tolist()) == list(range(64))
    for b in batches:
        assert sorted(np.bincount(b // 4, minlength=16)[np.unique(b // 4)].tolist()) == [4, 4, 4, 4]
    random = hard_batches(cls, batch=16, group=1, rng=rng)
    assert sorted(np.concatenate(random).tolist()) == list(range(64))
    assert any(len(np.unique(b // 4)) > 4 for b in random)  # random batches mix clusters


@pytest.mark.parametrize("cnn", ["none", "efficientnet-lite0"])
def test_the_whole_recipe_caches_trains_merges_and_exports(synthetic_data, tmp_path, cnn):
    """`emkum train-fine-grained` end to end on the synthetic collection with the tiny model: the cache
    holds every array the trainer reads (swaps included; the second tower's maps when asked for),
    training runs on it, the written checkpoint carries the head and the val-half choices (and the
    recipe that rebuilds the second tower from its package), and it exports with parity."""
    from training.export import export
    from training.feature_cache import SplitFeatures
    from training.fine_grained import FineGrainedRun, FineGrainedTrainConfig, run

    # the base model may carry a head of another shape already (the second tower widens its input)
    base = _tiny(None if cnn == "none" else FineGrainedConfig(vision_layers=(1, 2), context=3))
    save_checkpoint(tmp_path / "base.safetensors", base, InitRecipe(), seed=0, extra={"val": {"cls": {"mean6": 1.0}}})
    images = str(synthetic_data.parent / "images")
    cfg = FineGrainedRun(
        checkpoint=str(tmp_path / "base.safetensors"),
        out=str(tmp_path / "fg.safetensors"),
        train_data=f"karpathy:{synthetic_data}:{images}:train",
        val_data=f"karpathy:{synthetic_data}:{images}:val",
        val_half="all",
        cache_dir=str(tmp_path / "cache"),
        layers=(1, 2),
        train_collages={2: 1, 3: 1},
        train=FineGrainedTrainConfig(layers=(1, 2), epochs=1, batch=8, collage_batch=2, candidates=4, cnn=cnn),
    )
    summary = run(cfg)
    train = SplitFeatures.load(tmp_path / "cache" / "train")
    names = ["single_block1", "single_block2", "single_cls", "collage2_block2", "collage3_block1", "swap_tokens"]
    if cnn != "none":
        names += [f"{prefix}_{cnn}_{i}" for prefix in ("single", "collage2", "collage3") for i in (0, 1)]
    for name in names:
        assert (train.folder / f"{name}.npy").is_file(), name
    assert len(np.load(train.folder / "swap_image.npy")) > 0
    final = summary["history"][-1]
    assert {"rerank_mean6", "pointing2", "pointing3", "choice_cmli"} <= set(final)
    model, header = load_checkpoint(tmp_path / "fg.safetensors")
    assert model.cfg.fine_grained == FineGrainedConfig(vision_layers=(1, 2), hidden=0, context=3, cnn=cnn)
    assert header["init"].cnn == ("random" if cnn == "none" else cnn)
    assert header["extra"]["val"]["cls_weight"] == final["cls_weight"] and "cls" in header["extra"]["val"]
    card = export(tmp_path / "fg.safetensors", tmp_path / "out", fp16=False)
    assert all(err < 1e-4 for err in card["export"]["parity_relative_error"].values())


def test_the_context_head_starts_as_the_plain_head_and_reaches_only_its_neighbours():
    """FineGrainedHead(context=3): a residual depthwise 3x3 conv over the patch grid, zero at init."""
    from model.emkum import FineGrainedHead

    torch.manual_seed(0)
    plain = FineGrainedHead((8,), 6, 0)
    ctx = FineGrainedHead((8,), 6, 0, context=3)
    ctx.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 16, 8)  # a 4x4 grid
    assert torch.allclose(plain(x), ctx(x))
    torch.nn.init.normal_(ctx.context.weight)
    before = ctx(x)
    torch.testing.assert_close(ctx(x[1]), before[1])  # one image's [N, D] patches alone
    bumped = x.clone()
    bumped[:, 5] = torch.randn(2, 8)  # grid cell (1, 1)
    changed = (ctx(bumped) - before).abs().sum(-1).amax(0) > 1e-6
    near = {0, 1, 2, 4, 5, 6, 8, 9, 10}  # (1, 1) and its 8 neighbours
    assert {i for i in range(16) if changed[i]} == near
