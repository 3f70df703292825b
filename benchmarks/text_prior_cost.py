"""What would serving the frozen MiniLM cost a text query? The second opinion
(benchmarks/second_opinion.py) needs its mean-pooled sentence vector at query time, so the text graph
would run that tower beside ours. This exports the tower alone (ids, mask -> the mean of its word
outputs, [CLS] and [SEP] left out, as the benchmark pooled them), makes its dynamic int8 variant with
`emkum export`'s own `training/quantize.py quantize_int8` (the FFN output projections kept fp32), and
measures:

- how close the int8 sentence vectors stay to torch fp32 on real captions (cosine, mean and min);
- one query's median seconds through the served text graphs and through the tower's graphs, timed
  interleaved (training/quantize.py `interleaved_seconds`), the sessions opened as the service does.

    python benchmarks/text_prior_cost.py --model artifacts/emkum-flickr8k
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402
from model.checkpoint import read_header  # noqa: E402
from model.encoders import TextTransformer  # noqa: E402
from model.pretrained import load_bert_text, minilm_dir  # noqa: E402
from runtime.cpu import int8_weights_for_this_cpu  # noqa: E402
from runtime.encoders import open_session  # noqa: E402
from runtime.tokenizer import TextTokenizer  # noqa: E402
from training.quantize import interleaved_seconds, quantize_int8  # noqa: E402

CHECKPOINT = ROOT / "model" / "weights" / "emkum-flickr8k.partial.safetensors"
CAPTIONS = ROOT.parent / "shared" / "data" / "flickr8k" / "dataset_flickr8k.json"


class SentenceVector(torch.nn.Module):
    """ids, mask [B, L] -> the tower's mean output over the words [B, width]."""

    def __init__(self, tower: TextTransformer) -> None:
        super().__init__()
        self.text = tower  # named as in the served graph, so training/quantize.py keeps the same nodes fp32

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.text(ids, mask)
        t = self.text.cfg
        words = (mask.to(torch.bool) & (ids != t.cls_token_id) & (ids != t.sep_token_id)).to(out.dtype)[..., None]
        return (out * words).sum(1) / words.sum(1).clamp_min(1)


def val_captions(path: Path, count: int) -> list[str]:
    if not path.is_file():
        raise typer.BadParameter(f"{path} is missing: the Flickr8k captions come from ../shared/data/flickr8k")
    images = [im for im in json.loads(path.read_text())["images"] if im["split"] == "val"]
    return [s["raw"] for im in images for s in im["sentences"]][:count]


@torch.no_grad()
def main(
    model: Path = typer.Option(ROOT / "artifacts" / "emkum-flickr8k", help="an exported model folder"),
    captions: Path = typer.Option(CAPTIONS, help="Karpathy-format captions; the first val captions are used"),
    count: int = typer.Option(1000, help="captions for the int8 cosine"),
    length: int = typer.Option(12, help="tokens of the timed query"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "text_prior_cost.json"),
) -> None:
    torch.set_num_threads(2)
    cfg = read_header(CHECKPOINT)["config"].text
    tower = TextTransformer(dataclasses.replace(cfg, cls_zero_position=False)).eval()
    load_bert_text(tower)
    graph = SentenceVector(tower).eval()
    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", cfg.max_length)
    weights = int8_weights_for_this_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "prior.onnx", Path(tmp) / "prior.int8.onnx"
        ids = torch.full((2, 8), 1000, dtype=torch.int64)
        torch.onnx.export(
            graph,
            (ids, torch.ones_like(ids)),
            str(fp32),
            input_names=["ids", "mask"],
            output_names=["sentence"],
            dynamic_axes={"ids": {0: "batch", 1: "length"}, "mask": {0: "batch", 1: "length"}},
            opset_version=17,
            dynamo=False,
        )
        quantize_int8(fp32, int8, weights)
        cpu = ["CPUExecutionProvider"]
        sessions = {
            "served text.onnx": open_session(model / "text.onnx", cpu),
            "served text.int8.onnx": open_session(model / "text.int8.onnx", cpu),
            "frozen MiniLM fp32": open_session(fp32, cpu),
            "frozen MiniLM int8": open_session(int8, cpu),
        }
        cosines = []
        texts = val_captions(captions, count)
        for s in range(0, len(texts), 64):  # one caption per call, as the service runs int8 graphs
            for text in texts[s : s + 64]:
                b = tokenizer([text])
                feed = {"ids": b.ids, "mask": b.mask}
                ref = graph(torch.from_numpy(b.ids), torch.from_numpy(b.mask)).numpy()[0]
                got = sessions["frozen MiniLM int8"].run(None, feed)[0][0]
                cosines.append(float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got))))
        query = {"ids": np.full((1, length), 1000, dtype=np.int64), "mask": np.ones((1, length), dtype=np.int64)}
        query["ids"][0, 0], query["ids"][0, -1] = cfg.cls_token_id, cfg.sep_token_id
        seconds = interleaved_seconds(
            {name: (lambda s=sess: s.run(None, query)) for name, sess in sessions.items()}, 21
        )
    report = {
        "machine": describe(),
        "int8_weights": weights,
        "captions": len(cosines),
        "int8_cosine_to_torch": {"mean": float(np.mean(cosines)), "min": float(np.min(cosines))},
        "query_tokens": length,
        "median_ms": {k: round(1000 * v, 2) for k, v in seconds.items()},
    }
    out.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
