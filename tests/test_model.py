"""The network: shapes, masks, LayerScale and TTE placement, CMLI against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import Emkum, load_config
from model.cmli import (
    cmli_i2t_candidates,
    cmli_i2t_matrix,
    cmli_pairs,
    cmli_t2i_candidates,
    cmli_t2i_matrix,
)
from model.config import EmkumConfig
from tests.reference import cmli_i2t_loop, cmli_t2i_loop


def tiny(**overrides) -> Emkum:
    cfg = load_config("emkum-tiny")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return Emkum(cfg).eval()


def text_batch(cfg: EmkumConfig, lengths=(7, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths) + 2
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0] = cfg.text.cls_token_id
        ids[i, 1 : n + 1] = torch.randint(1000, 2000, (n,))
        ids[i, n + 1] = cfg.text.sep_token_id
        mask[i, : n + 2] = 1
    return ids, mask


def test_output_shapes_and_normalisation():
    model = tiny()
    cfg = model.cfg
    img = model.encode_image(torch.randn(3, 3, 32, 32))
    assert img.cls.shape == (3, cfg.proj_dim)
    assert img.patches.shape == (3, cfg.vision.num_patches, cfg.proj_dim)
    assert img.kd.shape == (3, cfg.teacher_dim)
    torch.testing.assert_close(img.cls.norm(dim=-1), torch.ones(3))
    ids, mask = text_batch(cfg)
    txt = model.encode_text(ids, mask)
    assert txt.tokens.shape == (2, ids.shape[1], cfg.proj_dim)
    # CLS, SEP and padding are not words
    assert txt.token_mask.tolist()[1] == [0, 1, 1, 1, 1, 0, 0, 0, 0]


def test_padding_tokens_change_nothing():
    model = tiny()
    ids, mask = text_batch(model.cfg, lengths=(3, 3))
    ids[1] = ids[0]
    ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    ids[1, -4:] = torch.randint(1000, 2000, (4,))  # garbage under the padding mask
    out = model.encode_text(ids, mask)
    torch.testing.assert_close(out.cls[0], out.cls[1])
    torch.testing.assert_close(out.tokens[0, :5], out.tokens[1, :5])


def test_tte_layer_scale_starts_at_1e5_and_is_shared():
    model = tiny()
    assert torch.all(model.type_scale.gamma == 1e-5)
    scales = [m for m in model.modules() if m.__class__.__name__ == "LayerScale" and m.gamma.shape[0] == 32]
    assert model.type_scale in scales and model.type_embed.weight.shape == (2, 32)


def test_tte_is_added_after_the_encoders():
    """Changing the type embedding must leave the tower outputs untouched and move the shared block's."""
    model = tiny()
    pixels = torch.randn(2, 3, 32, 32)
    before_tower = model.vision(pixels)
    before = model.encode_image(pixels).hidden
    with torch.no_grad():
        model.type_scale.gamma.fill_(1.0)
        model.type_embed.weight.normal_()
    torch.testing.assert_close(model.vision(pixels), before_tower)
    assert not torch.allclose(model.encode_image(pixels).hidden, before)


def test_tte_before_changes_the_tower_and_none_has_no_parameters():
    before = tiny(tte="before")
    pixels = torch.randn(2, 3, 32, 32)
    plain = before.vision(pixels)
    assert not torch.allclose(before.vision(pixels, before._type_vector(0)), plain)
    none = tiny(tte="none")
    assert none.type_embed is None and none.type_scale is None


def test_image_cls_has_zero_positional_encoding():
    model = tiny()
    assert model.vision.pos_embed.shape[1] == model.cfg.vision.num_patches  # patches only


def test_text_cls_position_is_zero_when_configured():
    model = tiny()
    ids, mask = text_batch(model.cfg, lengths=(3,))
    a = model.text(ids, mask)
    with torch.no_grad():
        model.text.pos_embed.weight[0].normal_()  # [T_CLS]'s slot: must not matter
    torch.testing.assert_close(model.text(ids, mask), a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmli_matches_bruteforce(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g), dim=-1)
    patches = torch.nn.functional.normalize(torch.randn(5, 9, 8, generator=g), dim=-1)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    mask[:, 1] = 1
    t2i = cmli_t2i_matrix(tokens, mask, patches, chunk=2)
    i2t = cmli_i2t_matrix(tokens, mask, patches, chunk=2)
    for t in range(4):
        for i in range(5):
            tk, pt, mk = tokens[t].numpy(), patches[i].numpy(), mask[t].numpy()
            assert t2i[t, i].item() == pytest.approx(cmli_t2i_loop(tk, mk, pt), abs=1e-5)
            assert i2t[i, t].item() == pytest.approx(cmli_i2t_loop(tk, mk, pt), abs=1e-5)
    pair_t2i, pair_i2t, best = cmli_pairs(tokens[:4], mask, patches[:4])
    torch.testing.assert_close(pair_t2i, torch.diagonal(t2i[:, :4]))
    torch.testing.assert_close(pair_i2t, torch.diagonal(i2t[:4, :4]))
    assert best[0, 1].item() == int(np.argmax(patches[0].numpy() @ tokens[0, 1].numpy()))
    # per-query candidate sets: text t gets images (t, t+1) and image i gets texts (i, i+1), mod size
    pick_img = torch.tensor([[t % 5, (t + 1) % 5] for t in range(4)])
    cand_t2i, _ = cmli_t2i_candidates(tokens, mask, patches[pick_img])
    torch.testing.assert_close(cand_t2i, torch.gather(t2i, 1, pick_img))
    pick_txt = torch.tensor([[i % 4, (i + 1) % 4] for i in range(5)])
    cand_i2t = cmli_i2t_candidates(patches, tokens[pick_txt], mask[pick_txt])
    torch.testing.assert_close(cand_i2t, torch.gather(i2t, 1, pick_txt))


def test_model_and_index_cmli_agree():
    from index.cmli import rerank_cmli

    g = torch.Generator().manual_seed(3)
    tokens = torch.nn.functional.normalize(torch.randn(1, 6, 8, generator=g), dim=-1)
    patches = torch.nn.functional.normalize(torch.randn(7, 9, 8, generator=g), dim=-1)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0]]).float()
    torch_scores = cmli_t2i_matrix(tokens, mask, patches)[0].numpy()
    np_scores = rerank_cmli(tokens[0].numpy(), mask[0].numpy(), patches.numpy())
    np.testing.assert_allclose(torch_scores, np_scores, atol=1e-6)
