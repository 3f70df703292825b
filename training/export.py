"""Export a checkpoint to the serving contract: `image.onnx`, `text.onnx`, `tokenizer.json` and
`model.json` (see docs/model-card.md), plus an fp16 variant for GPUs (`image.fp16.onnx`,
`text.fp16.onnx`) and an int8 variant for CPUs (`image.int8.onnx`, `text.int8.onnx`,
training/quantize.py). The export checks itself against torch on fresh random inputs and refuses to
leave a model that disagrees; an int8 graph that disagrees beyond its own tolerance is left out (the
variant uses that graph's fp32 file), and `model.json` says why and which variant a CPU serves by
default (the fastest within tolerance on the export machine).

The fp16 graphs are traced from a half-precision copy of the model, not converted afterwards: a
graph-level float16 converter has to guess which casts to keep, and guessed wrong for the text graph's
integer mask. Their inputs and outputs stay fp32, so serving code is the same for both variants."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.checkpoint import load_checkpoint
from model.emkum import Emkum
from model.pretrained import minilm_dir
from runtime.cpu import int8_weights_for_this_cpu
from runtime.modelcard import DEFAULT_CANDIDATES, DEFAULT_CLS_WEIGHT
from training.quantize import (
    INT8_TEXT_TOLERANCE,
    INT8_TOLERANCE,
    choose_cpu_precision,
    cpu_name,
    image_and_query_seconds,
    quantize_int8,
)

FORMAT_VERSION = 1
OPSET = 17
FP32_TOLERANCE = 1e-4  # max relative error of ONNX Runtime vs torch, both fp32
FP16_TOLERANCE = 5e-3  # fp16 keeps ~3 decimal digits; the default model's export measures ~1e-3


def half_precision(model: Emkum) -> Emkum:
    """A half-precision copy of `model` for the fp16 graphs, its ConvNet tower (model/cnn.py) kept
    fp32: in fp16 that tower's 1280-channel map drifts 1% from fp32 (its depthwise convolutions and
    folded batch norms), which put the patch vectors at 0.006 relative error against the 0.005
    tolerance; it is a tenth of the image graph's work."""
    half = copy.deepcopy(model).half()
    if half.cnn is not None:
        half.cnn.float()
    return half


def _to_model_dtype(model: Emkum, x: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


def _to_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x


class ImageGraph(nn.Module):
    """pixels [B, 3, S, S] (normalised with model.json's mean/std) -> cls [B, P], patches [B, N, P]."""

    def __init__(self, model: Emkum) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encode_image(_to_model_dtype(self.model, pixels), with_kd=False)
        return _to_fp32(out.cls), _to_fp32(out.patches)


class TextGraph(nn.Module):
    """ids, mask [B, L] int64 -> cls [B, P], tokens [B, L, P], token_mask [B, L] (1 = a word)."""

    def __init__(self, model: Emkum) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.encode_text(ids, mask, with_kd=False)
        return _to_fp32(out.cls), _to_fp32(out.tokens), _to_fp32(out.token_mask)


class ExportMismatch(RuntimeError):
    pass


def _random_inputs(model: Emkum, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v, t = model.cfg.vision, model.cfg.text
    pixels = torch.randn(3, 3, v.image_size, v.image_size, generator=g)
    length = min(12, t.max_length)
    ids = torch.randint(1000, t.vocab_size, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.int64)
    mask[1, length // 2 :] = 0  # a padded row
    ids[:, 0] = t.cls_token_id
    for row in range(3):
        last = int(mask[row].sum()) - 1
        ids[row, last] = t.sep_token_id
        ids[row, last + 1 :] = t.pad_token_id
    return pixels, ids, mask


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-12))


def parity_errors(model: Emkum, image_path: Path, text_path: Path, seed: int) -> dict[str, float]:
    """Relative error of every output of ONNX Runtime against torch fp32 on the same fresh random
    inputs (keys image.cls, image.patches, text.cls, text.tokens, text.token_mask)."""
    import onnxruntime as ort

    pixels, ids, mask = _random_inputs(model, seed)
    with torch.no_grad():
        ref_img = [x.float().numpy() for x in ImageGraph(model)(pixels)]
        ref_txt = [x.float().numpy() for x in TextGraph(model)(ids, mask)]
    cpu = ["CPUExecutionProvider"]
    img = ort.InferenceSession(str(image_path), providers=cpu).run(None, {"pixels": pixels.numpy()})
    txt = ort.InferenceSession(str(text_path), providers=cpu).run(None, {"ids": ids.numpy(), "mask": mask.numpy()})
    errors = {}
    for name, got, ref in zip(("cls", "patches"), img, ref_img, strict=True):
        errors[f"image.{name}"] = relative_error(got, ref)
    keep = mask.numpy().astype(bool)
    for name, got, ref in zip(("cls", "tokens", "token_mask"), txt, ref_txt, strict=True):
        if name == "tokens":  # padded positions are never read: compare real tokens only
            got, ref = got[keep], ref[keep]
        errors[f"text.{name}"] = relative_error(got, ref)
    return errors


def beyond(errors: dict[str, float], tolerance: float, graph: str = "") -> dict[str, float]:
    """The outputs (of `graph`, image or text; all when empty) whose error exceeds `tolerance`."""
    return {k: v for k, v in errors.items() if k.startswith(graph) and not v <= tolerance}


def check_parity(model: Emkum, image_path: Path, text_path: Path, tolerance: float, seed: int) -> dict:
    """Every output must agree with torch within `tolerance`, or ExportMismatch."""
    errors = parity_errors(model, image_path, text_path, seed)
    bad = beyond(errors, tolerance)
    if bad:
        raise ExportMismatch(
            f"{image_path.name}/{text_path.name}: ONNX Runtime disagrees with torch beyond {tolerance}: {bad}"
        )
    return errors


def _export_graphs(model: Emkum, folder: Path, suffix: str = "") -> None:
    """Write image{suffix}.onnx and text{suffix}.onnx traced from `model` (in its own dtype)."""
    pixels, ids, mask = _random_inputs(model, 0)
    kwargs = {"opset_version": OPSET, "dynamo": False, "do_constant_folding": True}
    torch.onnx.export(
        ImageGraph(model),
        (pixels,),
        str(folder / f"image{suffix}.onnx"),
        input_names=["pixels"],
        output_names=["cls", "patches"],
        dynamic_axes={"pixels": {0: "batch"}, "cls": {0: "batch"}, "patches": {0: "batch"}},
        **kwargs,
    )
    torch.onnx.export(
        TextGraph(model),
        (ids, mask),
        str(folder / f"text{suffix}.onnx"),
        input_names=["ids", "mask"],
        output_names=["cls", "tokens", "token_mask"],
        dynamic_axes={
            "ids": {0: "batch", 1: "length"},
            "mask": {0: "batch", 1: "length"},
            "cls": {0: "batch"},
            "tokens": {0: "batch", 1: "length"},
            "token_mask": {0: "batch", 1: "length"},
        },
        **kwargs,
    )


def model_card(
    model: Emkum, header: dict, name: str, parity: dict[str, dict], cpu: dict, int8_files: dict[str, str]
) -> dict:
    cfg = model.cfg
    extra = header.get("extra", {})
    val = extra.get("val") or {}
    files = {"image": "image.onnx", "text": "text.onnx", "tokenizer": "tokenizer.json"}
    if "fp16" in parity:
        files.update(image_fp16="image.fp16.onnx", text_fp16="text.fp16.onnx")
    files.update(int8_files)  # a graph that int8 could not keep within tolerance is its fp32 file
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "files": files,
        "dim": cfg.proj_dim,  # patch and word vectors
        "cls_dim": cfg.cls_dim,  # the CLS vectors: twice `dim` with a second opinion (model/config.py)
        "image": {
            "size": cfg.vision.image_size,
            "patch_size": cfg.vision.patch_size,
            "grid": cfg.vision.grid,
            "num_patches": cfg.vision.num_patches,
            "mean": list(cfg.vision.mean),
            "std": list(cfg.vision.std),
            "resize": "bicubic, squash to a square (as in training)",
        },
        "text": {
            "max_length": cfg.text.max_length,
            "cls_token_id": cfg.text.cls_token_id,
            "sep_token_id": cfg.text.sep_token_id,
            "pad_token_id": cfg.text.pad_token_id,
            "vocab_size": cfg.text.vocab_size,
        },
        "rerank": {
            "cls_weight": float(val.get("cls_weight", DEFAULT_CLS_WEIGHT)),
            "candidates": int(val.get("candidates", DEFAULT_CANDIDATES)),
        },
        "metrics": {"val": {k: val[k] for k in ("cls", "rerank", "cmli_only") if k in val}},
        # where the CMLI / explain vectors come from: None = the shared block's projection, else the
        # fine-grained head (model/emkum.py FineGrainedHead) and how it was trained and chosen
        "fine_grained": None
        if cfg.fine_grained is None
        else {**dataclasses.asdict(cfg.fine_grained), **extra.get("fine_grained", {})},
        "training": extra.get("train_config", {}),
        "init": header["init"].to_dict(),
        "model_config": cfg.to_dict(),
        "export": {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "opset": OPSET,
            "parity_relative_error": parity["fp32"],
            **({"parity_relative_error_fp16": parity["fp16"]} if "fp16" in parity else {}),
            **({"parity_relative_error_int8": parity["int8"]} if "int8" in parity else {}),
        },
        "cpu": cpu,
    }


VARIANTS = ("image.fp16.onnx", "text.fp16.onnx", "image.int8.onnx", "text.int8.onnx")


def _int8_variant(
    model: Emkum, folder: Path, parity: dict, tolerances: dict[str, float], seed: int
) -> tuple[dict[str, str], dict]:
    """Quantise each fp32 graph to int8 and keep it where it agrees with torch within its own
    tolerance (the text tower loses more to int8 than the image tower: docs/evidence.md); a graph
    beyond it stays fp32 in the int8 variant. Then choose the CPU default: the variant that answers
    one image and one query fastest on this machine. Returns (the variant's files, the card's `cpu`)."""
    files = {"image_int8": "image.int8.onnx", "text_int8": "text.int8.onnx"}
    weights = int8_weights_for_this_cpu()  # exact on this machine (runtime/cpu.py)
    quantize_int8(folder / "image.onnx", folder / files["image_int8"], weights)
    quantize_int8(folder / "text.onnx", folder / files["text_int8"], weights)
    errors = parity_errors(model, folder / files["image_int8"], folder / files["text_int8"], seed)
    refused = {}
    for graph in ("image", "text"):
        bad = beyond(errors, tolerances[graph], graph)
        if bad:
            refused[graph] = f"int8 {graph} graph beyond {tolerances[graph]}: {bad}"
            (folder / files[f"{graph}_int8"]).unlink()
            files[f"{graph}_int8"] = f"{graph}.onnx"
    cpu: dict = {"tolerances_int8": tolerances, "measured_on": cpu_name(), "int8_weights": weights}
    if len(refused) == 2:
        return {}, {"precision": "fp32", **cpu, "int8_refused": refused}
    parity["int8"] = errors
    size, length = model.cfg.vision.image_size, min(16, model.cfg.text.max_length)
    graphs = {
        "fp32": (folder / "image.onnx", folder / "text.onnx"),
        "int8": (folder / files["image_int8"], folder / files["text_int8"]),
    }
    seconds = image_and_query_seconds(graphs, size, length)
    choice = choose_cpu_precision({k: 1 / v for k, v in seconds.items()}, {"fp32": True, "int8": True})
    cpu.update(
        precision=choice,
        why="the variant answering one image and one query fastest on the export machine, within tolerances",
        ms_per_image_and_query=({k: round(v * 1000, 2) for k, v in seconds.items()}),
    )
    if refused:
        cpu["int8_refused"] = refused
    return files, cpu


def export(
    checkpoint: Path,
    out_dir: Path,
    name: str | None = None,
    tokenizer: Path | None = None,
    tolerance: float = FP32_TOLERANCE,
    seed: int | None = None,
    fp16: bool = True,
    fp16_tolerance: float = FP16_TOLERANCE,
    int8: bool = True,
    int8_tolerance: float = INT8_TOLERANCE,
    int8_text_tolerance: float = INT8_TEXT_TOLERANCE,
) -> dict:
    """Export and verify in a temporary folder, then move into `out_dir` only if every check passed.

    Both variants are checked against the fp32 torch model, so the fp16 figure is the whole error a
    user sees from running in half precision, not only the export's."""
    model, header = load_checkpoint(Path(checkpoint))
    out_dir = Path(out_dir)
    check_seed = seed if seed is not None else int.from_bytes(np.random.bytes(4), "little")
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        folder = Path(tmp)
        _export_graphs(model, folder)
        parity = {"fp32": check_parity(model, folder / "image.onnx", folder / "text.onnx", tolerance, check_seed)}
        written = ["image.onnx", "text.onnx"]
        if fp16:
            _export_graphs(half_precision(model), folder, ".fp16")
            images, texts = folder / "image.fp16.onnx", folder / "text.fp16.onnx"
            parity["fp16"] = check_parity(model, images, texts, fp16_tolerance, check_seed)
            written += [images.name, texts.name]
        cpu, int8_files = {"precision": "fp32"}, {}
        if int8:
            tolerances = {"image": int8_tolerance, "text": int8_text_tolerance}
            int8_files, cpu = _int8_variant(model, folder, parity, tolerances, check_seed)
            written += [f for f in int8_files.values() if ".int8." in f]
        shutil.copy(tokenizer or minilm_dir() / "tokenizer.json", folder / "tokenizer.json")
        card = model_card(model, header, name or model.cfg.name, parity, cpu, int8_files)
        (folder / "model.json").write_text(json.dumps(card, indent=2))
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in VARIANTS:  # never leave a variant model.json doesn't name
            (out_dir / stale).unlink(missing_ok=True)
        for f in [*written, "tokenizer.json", "model.json"]:
            shutil.move(str(folder / f), out_dir / f)
    return card
