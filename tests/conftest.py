from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised EMKUM exported to ONNX, with MiniLM's tokenizer."""
    from model.checkpoint import InitRecipe, build_model, save_checkpoint
    from model.config import load_config
    from training.export import export

    root = tmp_path_factory.mktemp("tiny-model")
    model = build_model(load_config("emkum-tiny"), InitRecipe(), seed=0)
    save_checkpoint(
        root / "tiny.safetensors",
        model,
        InitRecipe(),
        seed=0,
        extra={"val": {"cls_weight": 0.5, "candidates": 20}},
    )
    export(root / "tiny.safetensors", root / "exported", name="emkum-tiny")
    return root / "exported"


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    from tests.synthetic import make_karpathy

    return make_karpathy(tmp_path_factory.mktemp("synthetic"))
