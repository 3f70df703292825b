"""Model configuration as small dataclasses; named configs are JSON files in `model/configs/`.

A model is named by its config (open_clip's habit): `load_config("emkum-s14-minilm")` or a path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    layer_scale_init: float | None = 1.0  # DINOv2 blocks carry LayerScale; None = plain ViT block
    final_norm: bool = True
    norm_eps: float = 1e-6
    # BEiT's learned relative position bias in attention: one table per block, or one for all
    rel_pos_bias: Literal["none", "per_layer", "shared"] = "none"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class TextConfig:
    vocab_size: int = 30522
    width: int = 384
    depth: int = 6
    heads: int = 12
    mlp_ratio: float = 4.0
    max_positions: int = 512
    max_length: int = 64  # captions are padded/truncated to 64 tokens (the design card, section 3)
    post_norm: bool = True  # BERT/MiniLM layers are Post-LN; the seed's own encoder is Pre-LN
    embed_norm: bool = True  # BERT normalises the embedding sum
    cls_zero_position: bool = False  # seed 000 eq. 14: no positional encoding for [T_CLS]
    norm_eps: float = 1e-12
    cls_token_id: int = 101
    sep_token_id: int = 102
    pad_token_id: int = 0


@dataclass
class FineGrainedConfig:
    """A separate projection for the vectors CMLI and `explain` use (issue #14): patch vectors from
    the image-tower blocks `vision_layers` (each LayerNorm-ed, then concatenated), token vectors from
    the text tower's output, each through (an MLP of width `hidden`, when > 0) -> Linear to
    `proj_dim`. The global CLS path is untouched, so retrieval by CLS stays exactly as trained.

    Several blocks because they do different jobs (docs/fine-grained.md): block 10's patches stay
    local (words point at the right place), block 12's carry more meaning (the rerank ranks better)."""

    vision_layers: tuple[int, ...] = (10,)
    hidden: int = 0
    context: int = 0  # kernel of the patch head's residual depthwise conv over the grid (0: none)
    attention: int = 0  # self-attention blocks over the patch head's vectors, after the conv (0: none)
    # words only: each word's vector plus this times its caption's mean word vector (model/emkum.py)
    caption_context: float = 0.0
    # a second, frozen ConvNet tower whose maps the patch head reads beside the ViT blocks
    # (model/cnn.py: 'none', 'efficientnet-lite0' or 'efficientnet-lite2'); its weights come from its pip package
    cnn: str = "none"
    # A second global vector from evidence CLS does not have: the ConvNet's maps mean-pooled, against
    # the text tower's outputs mean-pooled over the words, each through LayerNorm + Linear, trained
    # without CLS (training/second_opinion.py). The served CLS vector is then
    # [sqrt(1 - w) CLS, sqrt(w) second], so one inner product is (1 - w) CLS + w second and the first
    # stage searches the fused score (docs/fine-grained.md). The weight w; 0: none.
    second_opinion: float = 0.0


@dataclass
class EmkumConfig:
    name: str = "emkum"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    width: int = 384  # width of the shared block
    shared_depth: int = 1
    shared_heads: int = 6
    shared_mlp_ratio: float = 4.0
    shared_layer_scale_init: float = 0.2  # LayerScale on both residual branches of the shared block
    tte: Literal["after", "before", "none"] = "after"  # seed 003: after the encoders, eq. 4-5
    tte_layer_scale_init: float = 1e-5
    proj_dim: int = 256  # FILIP's token dimension
    teacher_dim: int | None = 1280  # KD regression head output (EfficientNet-Lite0 features)
    fine_grained: FineGrainedConfig | None = None  # None: patches and tokens come from the shared block

    @property
    def cls_dim(self) -> int:
        """The served CLS vector's width: `proj_dim`, twice that with a second opinion."""
        fg = self.fine_grained
        return self.proj_dim * (2 if fg is not None and fg.second_opinion else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmkumConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kwargs = dict(data)
        vision = dict(kwargs.pop("vision", {}))
        for key in ("mean", "std"):
            if key in vision:
                vision[key] = tuple(vision[key])
        kwargs["vision"] = VisionConfig(**vision)
        kwargs["text"] = TextConfig(**kwargs.pop("text", {}))
        if kwargs.get("fine_grained") is not None:
            fg = dict(kwargs["fine_grained"])
            fg["vision_layers"] = tuple(fg["vision_layers"])
            kwargs["fine_grained"] = FineGrainedConfig(**fg)
        return cls(**kwargs)


def load_config(name_or_path: str | Path) -> EmkumConfig:
    """Load a named config from `model/configs/` or a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"model config {name_or_path!r} not found; named configs: {available}")
    return EmkumConfig.from_dict(json.loads(path.read_text()))
