"""ONNX Runtime encoders of an exported model: which provider and which graphs (fp32, fp16 on CUDA,
int8 on CPU), and the batched calls that turn pixels and token ids into vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.cpu import int8_exact

log = logging.getLogger(__name__)


def choose_providers(preference: str) -> list[str]:
    """CUDA when asked for (or 'auto') and this onnxruntime build has it; CPU otherwise.

    An onnxruntime-gpu build lists CUDA whether or not a GPU is there; `Encoders` finds out when the
    first session opens. Where CUDA and cuDNN come from the nvidia-* wheels (the GPU image), they are
    not on the loader's path: `preload_dlls` loads them from site-packages first."""
    available = ort.get_available_providers()
    if preference in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def has_variant(card: dict, precision: str) -> bool:
    return precision == "fp32" or (f"image_{precision}" in card["files"] and f"text_{precision}" in card["files"])


def choose_precision(card: dict, preference: str, provider: str) -> str:
    """'auto': fp16 on CUDA when the model ships it; on CPU the graph the export chose (model.json
    `cpu.precision`: the fastest on the export machine within its parity tolerance, int8 for the
    default model), unless its int8 weights would saturate on this CPU (runtime/cpu.py). A named
    precision is served as asked.

    Asking for a variant the model was exported without is a configuration error, said at start-up,
    rather than a silent fall back to fp32."""
    cpu = card.get("cpu", {})
    saturates = not int8_exact(cpu.get("int8_weights", "s8"))
    if preference != "auto":
        if not has_variant(card, preference):
            raise ValueError(
                f"precision {preference} asked, but {card['name']} has no {preference} variant: "
                "re-export it with `emkum export`"
            )
        if preference == "int8" and saturates:
            log.warning("int8 asked for: its int8 weights saturate on this CPU (no VNNI); re-export here")
        return preference
    if provider == "CUDAExecutionProvider":
        return "fp16" if has_variant(card, "fp16") else "fp32"
    chosen = cpu.get("precision", "fp32")
    if chosen == "int8" and saturates:
        # exported on a CPU with VNNI, served on one without: its int8 weights would saturate here
        log.warning("the int8 graphs' int8 weights saturate on this CPU (no VNNI): serving fp32")
        return "fp32"
    return chosen if has_variant(card, chosen) else "fp32"


def graph_files(card: dict, precision: str) -> tuple[str, str]:
    """The (image, text) graph files of a precision variant, as model.json names them."""
    suffix = "" if precision == "fp32" else f"_{precision}"
    return card["files"][f"image{suffix}"], card["files"][f"text{suffix}"]


def open_session(path: Path, providers: list[str], threads: int = 0, spinning: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session. Spinning is off by default: the service runs FAISS and numpy on the
    same cores between encoder calls, and ONNX Runtime's threads spinning for work steal their time."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


@dataclass
class ImageEmbedding:
    cls: np.ndarray  # [P]
    patches: np.ndarray  # [N, P]


@dataclass
class TextEmbedding:
    cls: np.ndarray  # [P]
    tokens: np.ndarray  # [L, P]
    mask: np.ndarray  # [L] 1 for words (not CLS, SEP or padding)


class Encoders:
    """The image and text graphs of one exported model as ONNX Runtime sessions: batched calls that
    everything embedding images or queries goes through (the service puts its micro-batchers in
    front, service/batching.py)."""

    def __init__(
        self,
        model_dir: Path,
        card: dict,
        providers: str = "auto",
        precision: str = "fp32",
        threads: int = 0,
        spinning: bool = False,
    ) -> None:
        self.card = card
        self.providers = choose_providers(providers)
        self.precision = choose_precision(card, precision, self.providers[0])
        image_file, text_file = graph_files(card, self.precision)
        self.image_session = open_session(model_dir / image_file, self.providers, threads, spinning)
        if self.image_session.get_providers()[0] != self.providers[0]:
            # CUDA was listed but could not start (no GPU visible, no driver): ONNX Runtime fell back
            # to the CPU on its own, with the graphs chosen for the GPU. Choose the CPU's instead.
            log.warning("CUDA could not start (no GPU visible?): serving on the CPU")
            self.providers = ["CPUExecutionProvider"]
            self.precision = choose_precision(card, precision, self.providers[0])
            image_file, text_file = graph_files(card, self.precision)
            self.image_session = open_session(model_dir / image_file, self.providers, threads, spinning)
        self.text_session = open_session(model_dir / text_file, self.providers, threads, spinning)
        self.provider = self.image_session.get_providers()[0]
        # The int8 graphs quantise activations per call from the range of the whole batch (dynamic
        # int8, training/quantize.py), so an input's vectors would depend on what it was batched with:
        # the same photo drifted to cosine 0.9968 of itself, alone against in a batch of 8, and a
        # query's results on who else was searching. They run one input per call instead, which on
        # the AVX2 box is also faster (benchmarks/encoder_bench.py, batch 1 against 8).
        self.one_per_call = self.precision == "int8"

    def embed_images_now(self, pixels: list[np.ndarray]) -> list[ImageEmbedding]:
        """The image graph on these inputs: one batched call (one per input for the int8 graphs)."""
        batches = [[p] for p in pixels] if self.one_per_call else [pixels]
        out = []
        for batch in batches:
            cls, patches = self.image_session.run(None, {"pixels": np.stack(batch).astype(np.float32)})
            out.extend(ImageEmbedding(cls[i], patches[i]) for i in range(len(batch)))
        return out

    def embed_tokens_now(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[TextEmbedding]:
        """The text graph on (ids, mask) rows of any lengths: one padded batch (one call per row for
        the int8 graphs)."""
        if self.one_per_call and len(items) > 1:
            return [e for item in items for e in self._embed_tokens([item])]
        return self._embed_tokens(items)

    def _embed_tokens(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[TextEmbedding]:
        width = max(len(ids) for ids, _ in items)
        ids = np.zeros((len(items), width), dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for i, (row_ids, row_mask) in enumerate(items):
            ids[i, : len(row_ids)] = row_ids
            mask[i, : len(row_mask)] = row_mask
        cls, tokens, word_mask = self.text_session.run(None, {"ids": ids, "mask": mask})
        out = []
        for i, (row_ids, _) in enumerate(items):
            n = len(row_ids)
            out.append(TextEmbedding(cls[i], tokens[i, :n], word_mask[i, :n]))
        return out

    def close(self) -> None:
        """Sessions need no closing; subclasses with worker threads stop them here."""
