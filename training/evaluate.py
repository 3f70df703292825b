"""In-training evaluation in torch (fast on the training GPU): CLS ranking, CMLI rerank of the top K,
and the fusion weight between the two chosen on this split. `emkum eval` (training/eval_exported.py)
measures the exported model through ONNX Runtime and `index/` instead."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from model.cmli import cmli_i2t_candidates, cmli_t2i_candidates
from model.emkum import Emkum
from training.augment import normalize
from training.metrics import i2t_recall, rerank, summarise, t2i_recall

FUSION_GRID = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 11))


@torch.no_grad()
def embed_split(
    model: Emkum, images: np.ndarray, ids: np.ndarray, mask: np.ndarray, device: str, batch: int = 128
) -> dict[str, torch.Tensor]:
    model.eval()
    mean, std = model.cfg.vision.mean, model.cfg.vision.std
    img_cls, img_patch, txt_cls, txt_tok, txt_mask = [], [], [], [], []
    for s in tqdm(range(0, len(images), batch), desc="embed images", leave=False):
        px = torch.from_numpy(images[s : s + batch]).to(device).permute(0, 3, 1, 2).float() / 255
        out = model.encode_image(normalize(px, mean, std), with_kd=False)
        img_cls.append(out.cls.float())
        img_patch.append(out.patches.half())
    for s in tqdm(range(0, len(ids), batch), desc="embed texts", leave=False):
        i = torch.from_numpy(ids[s : s + batch]).to(device)
        m = torch.from_numpy(mask[s : s + batch]).to(device)
        out = model.encode_text(i, m, with_kd=False)
        txt_cls.append(out.cls.float())
        txt_tok.append(out.tokens.half())
        txt_mask.append(out.token_mask.half())
    return {
        "img_cls": torch.cat(img_cls),
        "img_patch": torch.cat(img_patch),
        "txt_cls": torch.cat(txt_cls),
        "txt_tok": torch.cat(txt_tok),
        "txt_mask": torch.cat(txt_mask),
    }


@torch.no_grad()
def evaluate_embeddings(emb: dict[str, torch.Tensor], caption_image: np.ndarray, candidates: int = 20) -> dict:
    """Returns {"cls": ..., "rerank": ..., "cls_weight": w} with the fusion weight tuned here."""
    sim = emb["txt_cls"] @ emb["img_cls"].T  # [T, I]
    k = min(candidates, sim.shape[1], sim.shape[0])
    t2i_scores, t2i_cand = sim.topk(k, dim=1)
    i2t_scores, i2t_cand = sim.T.topk(k, dim=1)
    t2i_cmli = torch.empty_like(t2i_scores)
    for s in range(0, sim.shape[0], 64):  # text query: eq. 4 against each candidate's patches
        tok = emb["txt_tok"][s : s + 64].float()
        msk = emb["txt_mask"][s : s + 64].float()
        pat = emb["img_patch"][t2i_cand[s : s + 64]].float()  # [b, k, N, d]
        t2i_cmli[s : s + 64] = cmli_t2i_candidates(tok, msk, pat)[0]
    i2t_cmli = torch.empty_like(i2t_scores)
    for s in range(0, sim.shape[1], 64):  # image query: eq. 3, mean over patches of max over words
        pat = emb["img_patch"][s : s + 64].float()
        tok = emb["txt_tok"][i2t_cand[s : s + 64]].float()  # [b, k, M, d]
        msk = emb["txt_mask"][i2t_cand[s : s + 64]]
        i2t_cmli[s : s + 64] = cmli_i2t_candidates(pat, tok, msk)
    arrays = [x.cpu().numpy() for x in (t2i_cand, t2i_scores, t2i_cmli, i2t_cand, i2t_scores, i2t_cmli)]
    t2i_c, t2i_s, t2i_m, i2t_c, i2t_s, i2t_m = arrays
    cls = summarise(i2t_recall(i2t_c, caption_image), t2i_recall(t2i_c, caption_image))
    best = None
    for w in FUSION_GRID:
        res = summarise(
            i2t_recall(rerank(i2t_c, i2t_s, i2t_m, w), caption_image),
            t2i_recall(rerank(t2i_c, t2i_s, t2i_m, w), caption_image),
        )
        if best is None or res["mean6"] > best[1]["mean6"]:
            best = (w, res)
    cmli_only = summarise(
        i2t_recall(rerank(i2t_c, i2t_s, i2t_m, 0.0), caption_image),
        t2i_recall(rerank(t2i_c, t2i_s, t2i_m, 0.0), caption_image),
    )
    return {"cls": cls, "rerank": best[1], "cls_weight": best[0], "cmli_only": cmli_only, "candidates": k}
