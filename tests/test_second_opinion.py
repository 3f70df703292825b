"""The second opinion (issue #14): a global vector from the ConvNet's pooled maps and the text
tower's pooled words, joined to CLS in the served vector, trained without CLS on cached features."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import InitRecipe, load_checkpoint, save_checkpoint
from model.config import FineGrainedConfig
from tests.test_fine_grained import _tiny as tiny_model
from tests.test_fine_grained import synthetic_cache

W = 0.3
CONFIG = FineGrainedConfig(vision_layers=(2,), context=3, cnn="efficientnet-lite0", second_opinion=W)


def _tiny(fine_grained: FineGrainedConfig):
    return tiny_model(fine_grained, InitRecipe(cnn="efficientnet-lite0"))


def _inputs():
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[101, 2000, 3000, 102], [101, 2500, 102, 0]])
    return pixels, ids, (ids != 0).long()


@torch.no_grad()
def test_the_served_cls_vector_joins_cls_and_the_second_opinion_and_nothing_else_changes():
    model = _tiny(CONFIG)
    plain = _tiny(dataclasses.replace(CONFIG, second_opinion=0.0))
    plain.load_state_dict(model.state_dict(), strict=False)  # the same towers and heads, no second opinion
    pixels, ids, mask = _inputs()
    img, ref_img = model.encode_image(pixels), plain.encode_image(pixels)
    txt, ref_txt = model.encode_text(ids, mask), plain.encode_text(ids, mask)
    p = model.cfg.proj_dim
    assert model.cfg.cls_dim == 2 * p and img.cls.shape == (2, 2 * p) and txt.cls.shape == (2, 2 * p)
    torch.testing.assert_close(img.cls.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(img.cls[:, :p], math.sqrt(1 - W) * ref_img.cls)
    torch.testing.assert_close(txt.cls[:, :p], math.sqrt(1 - W) * ref_txt.cls)
    torch.testing.assert_close(img.patches, ref_img.patches)  # the CMLI vectors are untouched
    torch.testing.assert_close(txt.tokens, ref_txt.tokens)
    # the image's second opinion: its ConvNet maps averaged over the grid
    pooled = torch.cat([m.mean(1) for m in model.cnn(pixels)], dim=-1)
    torch.testing.assert_close(img.cls[:, p:], math.sqrt(W) * F.normalize(model.second_image(pooled), dim=-1))
    # the text's: the tower's outputs averaged over the words only ([CLS], [SEP], padding left out)
    tower = model.text(ids, mask)
    words = tower[1, 1:2]  # "[CLS] 2500 [SEP] pad": one word
    torch.testing.assert_close(txt.cls[1, p:], math.sqrt(W) * F.normalize(model.second_text(words.mean(0)), dim=-1))
    # one inner product is the fused score
    second_img, second_txt = img.cls[:, p:] / math.sqrt(W), txt.cls[:, p:] / math.sqrt(W)
    fused = (1 - W) * ref_txt.cls @ ref_img.cls.T + W * second_txt @ second_img.T
    torch.testing.assert_close(txt.cls @ img.cls.T, fused)


def test_a_second_opinion_needs_a_convnet_and_a_weight_between_0_and_1():
    with pytest.raises(ValueError, match="reads the ConvNet's maps"):
        _tiny(FineGrainedConfig(vision_layers=(2,), second_opinion=W))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        _tiny(dataclasses.replace(CONFIG, second_opinion=1.0))


def test_the_second_opinion_ships_in_the_checkpoint_and_serves_through_the_store(tmp_path):
    """A partial checkpoint carries its two heads (not the ConvNet); the export keeps parity and
    tells the store the CLS width; the graphs' vectors go into a store and come back by search."""
    import onnxruntime as ort

    from index import Query, VectorStore
    from index.store import ItemInput
    from runtime.modelcard import store_config
    from training.export import export

    model = _tiny(CONFIG)
    names = {k for k in model.state_dict() if k.startswith(("fg_image.", "fg_text.", "second_"))}
    assert {"second_image.1.weight", "second_text.1.weight"} <= names
    save_checkpoint(tmp_path / "p.safetensors", model, InitRecipe(cnn="efficientnet-lite0"), 0, only=names)
    again, header = load_checkpoint(tmp_path / "p.safetensors")
    assert header["config"].fine_grained == CONFIG
    pixels = _inputs()[0]
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels).cls, model.encode_image(pixels).cls)
    card = export(tmp_path / "p.safetensors", tmp_path / "out", fp16=False)
    assert all(err < 1e-4 for err in card["export"]["parity_relative_error"].values())
    written = json.loads((tmp_path / "out" / "model.json").read_text())
    p = written["dim"]
    assert written["cls_dim"] == 2 * p and written["model_config"]["fine_grained"]["second_opinion"] == W
    config = store_config(written, use_gpu=False)
    assert config.global_dim == 2 * p
    cpu = ["CPUExecutionProvider"]
    image = ort.InferenceSession(str(tmp_path / "out" / "image.onnx"), providers=cpu)
    cls, patches = image.run(None, {"pixels": pixels.numpy()})
    assert cls.shape == (2, 2 * p) and patches.shape[-1] == p
    store = VectorStore(tmp_path / "store", config)
    store.add([ItemInput(f"photo{i}", cls[i], patches[i], {}) for i in range(2)])
    for i in range(2):
        assert store.search(Query(cls[i]), k=1, rerank=False)[0].id == f"photo{i}"


def test_the_trainer_learns_what_cls_cannot_tell_apart(tmp_path, rng):
    """A cache where twin images share one CLS vector and only the ConvNet's map shows their
    (different) concepts: the second opinion alone only knows the concept (4 of them), CLS alone
    confuses twins; fused with the weight chosen on the val split, the twins come apart."""
    from training.feature_cache import SplitFeatures
    from training.second_opinion import SecondOpinionRun, mean6, pooled, second_weight, train_heads

    synthetic_cache(tmp_path / "train", rng, twin_cls=True, in_cnn=True)
    synthetic_cache(tmp_path / "val", np.random.default_rng(99), twin_cls=True, in_cnn=True)
    train = pooled(SplitFeatures.load(tmp_path / "train"), "efficientnet-lite0", 2)
    val_feats = SplitFeatures.load(tmp_path / "val")
    val = pooled(val_feats, "efficientnet-lite0", 2)
    assert train.image.shape == (256, 112 + 1280) and train.text.shape == (512, 8)
    heads, history = train_heads(train, val, 16, SecondOpinionRun(epochs=15, batch=32, lr=1e-2))
    assert len(history) == 15
    cls = tuple(torch.from_numpy(np.load(tmp_path / "val" / f"{n}.npy")) for n in ("single_cls", "text_cls"))
    with torch.no_grad():
        second = heads.vectors(val.image, val.text)
    alone, cls_only = mean6(second[1] @ second[0].T, val.caption_image), mean6(cls[1] @ cls[0].T, val.caption_image)
    w, fused = second_weight(cls, second, val.caption_image)
    assert alone < 40 and cls_only < 90, (alone, cls_only)  # each alone misses what the other knows
    assert 0 < w < 1 and fused[w] >= 99, (w, fused)
