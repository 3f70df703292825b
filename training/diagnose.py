"""Where does the fine-grained channel lose locality? Reads patch vectors out at every stage of the
torch model on val collages and measures, per stage: text-free patch locality, the shared (mean)
component, and, where words can be compared (the projected spaces), word pointing, caption-cell
choice and whether the map is inverted. `python -m training.diagnose --help`; results in
docs/fine-grained.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from tqdm import tqdm

from model.checkpoint import load_checkpoint
from model.emkum import IMAGE_TYPE, TEXT_TYPE, Emkum
from model.layers import key_padding_bias
from model.pretrained import minilm_dir
from runtime.tokenizer import TextTokenizer
from training.augment import normalize
from training.collage import collage_groups, make_collage, patch_cells
from training.data import load_images, read_spec, select_half
from training.pointing import PointingTally, common_share, patch_locality


def fine_grained_stage(model: Emkum) -> str:
    fg = model.cfg.fine_grained
    cnn = f" + {fg.cnn}" if fg.cnn != "none" else ""
    return "fine-grained head (blocks " + "+".join(map(str, fg.vision_layers)) + cnn + ")"


@torch.no_grad()
def image_stages(model: Emkum, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Patch vectors [B, N, d] at each stage; the `->proj` entries are in the projected space where
    words live: the stage's patches through the model's own final norm and image projection. With a
    fine-grained head, its output too (what the model then serves to CMLI and `explain`)."""
    v = model.vision
    fg = model.cfg.fine_grained
    keep = tuple(sorted({4, 8, 10, *(fg.vision_layers if fg else ())}))
    tower, kept = v.forward_layers(pixels, None, keep)
    out: dict[str, torch.Tensor] = {f"tower block {i}": kept[i][:, 1:] for i in (4, 8, 10)}
    out["tower output"] = tower[:, 1:]
    h = model.vision_adapter(tower)
    h = h + model.type_scale(model._type_vector(IMAGE_TYPE))
    out["after TTE"] = h[:, 1:]
    out["after TTE->proj"] = F.normalize(model.image_proj(model.final_norm(h)), dim=-1)[:, 1:]
    for block in model.shared:
        h = block(h, None)
    out["after shared block"] = model.final_norm(h)[:, 1:]
    out["shared projection"] = F.normalize(model.image_proj(model.final_norm(h)), dim=-1)[:, 1:]
    if fg:
        maps = model.cnn(pixels) if model.cnn is not None else []
        out[fine_grained_stage(model)] = model.fine_grained_patches(kept, maps)
    return out


@torch.no_grad()
def text_stages(model: Emkum, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token vectors in the projected space, keyed like the image stages they are compared with."""
    tower = model.text(ids, mask)
    h = model.text_adapter(tower) + model.type_scale(model._type_vector(TEXT_TYPE))
    out = {"after TTE->proj": F.normalize(model.text_proj(model.final_norm(h)), dim=-1)}
    bias = key_padding_bias(mask, h.dtype)
    for block in model.shared:
        h = block(h, bias)
    out["shared projection"] = F.normalize(model.text_proj(model.final_norm(h)), dim=-1)
    fg = model.cfg.fine_grained
    if fg:
        t = model.cfg.text
        words = mask.bool() & (ids != t.cls_token_id) & (ids != t.sep_token_id)
        out[fine_grained_stage(model)] = model.fg_text(tower, words=words)
    return out


def diagnose(checkpoint: Path, data: str, grid: int = 2, collages: int = 100, half: str = "a") -> dict:
    model, _ = load_checkpoint(checkpoint)
    cfg = model.cfg
    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", cfg.text.max_length)
    pairs = select_half(read_spec(data), half)
    groups = collage_groups(len(pairs), grid)[:collages]
    images = load_images([pairs[i] for i in np.unique(groups)], cfg.vision.image_size)
    where = {int(i): n for n, i in enumerate(np.unique(groups))}
    cells = patch_cells(cfg.vision.grid, grid)
    tallies: dict[str, PointingTally] = {}
    locality: dict[str, list[float]] = {}
    common: dict[str, list[float]] = {}
    for group in tqdm(groups, desc=f"{grid}x{grid} collages", unit="collage"):
        collage = make_collage([images[where[int(i)]] for i in group], cfg.vision.image_size)
        px = torch.from_numpy(collage)[None].permute(0, 3, 1, 2).float() / 255
        stages = image_stages(model, normalize(px, cfg.vision.mean, cfg.vision.std))
        captions = [pairs[int(i)].captions[0] for i in group]
        batch = tokenizer(captions)
        ids, mask = torch.from_numpy(batch.ids), torch.from_numpy(batch.mask)
        words = text_stages(model, ids, mask)
        word_mask = model.encode_text(ids, mask, with_kd=False).token_mask.numpy()  # words: not CLS/SEP/pad
        for name, patches in stages.items():
            p = patches[0].float().numpy()
            locality.setdefault(name, []).append(patch_locality(p, cells))
            common.setdefault(name, []).append(common_share(p))
            if name in words:
                tally = tallies.setdefault(name, PointingTally())
                for c in range(len(group)):
                    sim = words[name][c].numpy() @ p.T
                    tally.add(sim, batch.words[c], word_mask[c], cells, c)
    rows = {}
    for name in locality:
        rows[name] = {
            "locality": round(float(np.mean(locality[name])), 4),
            "common": round(float(np.mean(common[name])), 4),
        }
        if name in tallies:
            rows[name].update(tallies[name].summary())
    return {"grid": grid, "collages": len(groups), "half": half, "chance": round(100 / grid**2, 2), "stages": rows}


def main(
    checkpoint: Path = typer.Option(..., help="a .safetensors checkpoint"),
    data: str = typer.Option(..., help="karpathy:JSON:IMAGES:val"),
    grid: int = typer.Option(2, help="collage cells per side"),
    collages: int = typer.Option(100),
    half: str = typer.Option("a", help="val half: a (tuning), b (report) or all"),
    json_out: Path | None = typer.Option(None),
) -> None:
    """Per-stage locality, shared component and pointing of the model's patch vectors on collages."""
    result = diagnose(checkpoint, data, grid, collages, half)
    text = json.dumps(result, indent=2)
    if json_out:
        json_out.write_text(text)
    typer.echo(text)


if __name__ == "__main__":
    typer.run(main)
