"""Export writes the serving contract and checks itself."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.checkpoint import InitRecipe, build_model, load_checkpoint, save_checkpoint
from model.config import load_config
from training import export as export_mod


def test_exported_model_card_and_graphs(tiny_model_dir):
    card = json.loads((tiny_model_dir / "model.json").read_text())
    assert card["dim"] == 16 and card["image"]["num_patches"] == 16 and card["text"]["max_length"] == 16
    assert all(err < 1e-4 for err in card["export"]["parity_relative_error"].values())
    session = ort.InferenceSession(str(tiny_model_dir / "image.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis
        cls, patches = session.run(None, {"pixels": np.random.rand(batch, 3, 32, 32).astype(np.float32)})
        assert cls.shape == (batch, 16) and patches.shape == (batch, 16, 16)


def test_parity_check_refuses_a_model_that_disagrees(tmp_path, monkeypatch):
    model = build_model(load_config("emkum-tiny"), InitRecipe(), seed=0)
    save_checkpoint(tmp_path / "m.safetensors", model, InitRecipe(), seed=0)
    original = export_mod._export_graphs

    def sabotaged(model, folder, suffix=""):
        noise = torch.randn_like(model.vision.blocks[0].mlp.fc1.weight)
        with torch.no_grad():
            model.vision.blocks[0].mlp.fc1.weight.add_(noise)  # the graph now differs from torch
        original(model, folder, suffix)
        with torch.no_grad():
            model.vision.blocks[0].mlp.fc1.weight.sub_(noise)

    monkeypatch.setattr(export_mod, "_export_graphs", sabotaged)
    with pytest.raises(export_mod.ExportMismatch, match="image"):
        export_mod.export(tmp_path / "m.safetensors", tmp_path / "out")
    assert not (tmp_path / "out" / "model.json").exists()


def test_fp16_variant_is_half_precision_inside_and_fp32_outside(tiny_model_dir):
    card = json.loads((tiny_model_dir / "model.json").read_text())
    assert card["files"]["image_fp16"] == "image.fp16.onnx" and card["files"]["text_fp16"] == "text.fp16.onnx"
    errors = card["export"]["parity_relative_error_fp16"]
    assert set(errors) == set(card["export"]["parity_relative_error"])
    assert all(err < export_mod.FP16_TOLERANCE for err in errors.values())
    for name in ("image", "text"):
        graph = onnx.load(str(tiny_model_dir / f"{name}.fp16.onnx")).graph
        weights = [t for t in graph.initializer if len(t.dims) == 2]  # the Linear weights
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in graph.output)
    pixels = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    full, half = (
        ort.InferenceSession(str(tiny_model_dir / f), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})
        for f in ("image.onnx", "image.fp16.onnx")
    )
    assert half[0].dtype == np.float32
    np.testing.assert_allclose(half[0], full[0], atol=5e-3)
    assert not np.array_equal(half[0], full[0])  # really a different (half-precision) computation


def test_fp16_parity_is_checked_too(tmp_path, monkeypatch):
    model = build_model(load_config("emkum-tiny"), InitRecipe(), seed=0)
    save_checkpoint(tmp_path / "m.safetensors", model, InitRecipe(), seed=0)
    original = export_mod._export_graphs

    def sabotage_fp16_only(model, folder, suffix=""):
        if suffix:
            with torch.no_grad():
                model.text.token_embed.weight.mul_(-1)
        original(model, folder, suffix)

    monkeypatch.setattr(export_mod, "_export_graphs", sabotage_fp16_only)
    with pytest.raises(export_mod.ExportMismatch, match=r"text\.fp16\.onnx"):
        export_mod.export(tmp_path / "m.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = export_mod.export(tmp_path / "m.safetensors", tmp_path / "plain", fp16=False)
    assert "image_fp16" not in card["files"] and not (tmp_path / "plain" / "image.fp16.onnx").exists()


def test_export_with_beit_relative_position_bias(tmp_path):
    """A BEiT-initialised image tower exports like any other: the bias is a Gather from its table."""
    cfg = load_config("emkum-tiny")
    cfg.vision.rel_pos_bias = "per_layer"
    model = build_model(cfg, InitRecipe(), seed=0)
    with torch.no_grad():
        for table in model.vision.rel_pos:
            table.table.normal_()
    save_checkpoint(tmp_path / "m.safetensors", model, InitRecipe(), seed=0)
    card = export_mod.export(tmp_path / "m.safetensors", tmp_path / "out", fp16=False)
    assert card["model_config"]["vision"]["rel_pos_bias"] == "per_layer"
    assert all(err < 1e-4 for err in card["export"]["parity_relative_error"].values())


def test_partial_checkpoint_replays_init(tmp_path):
    model = build_model(load_config("emkum-tiny"), InitRecipe(), seed=3)
    only = {"shared.0.attn.qkv.weight"}
    with torch.no_grad():
        model.shared[0].attn.qkv.weight.add_(1.0)
    save_checkpoint(tmp_path / "p.safetensors", model, InitRecipe(), seed=3, only=only, dtype=torch.float16)
    loaded, header = load_checkpoint(tmp_path / "p.safetensors")
    assert header["partial"]
    torch.testing.assert_close(loaded.shared[0].attn.qkv.weight, model.shared[0].attn.qkv.weight, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(loaded.vision.pos_embed, model.vision.pos_embed)  # rebuilt from the seed
