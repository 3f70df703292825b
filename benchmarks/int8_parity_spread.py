"""The spread of the int8 graphs' parity error over the export's random inputs, seed by seed: why
`emkum build-default` checks on a fixed seed (a random one refused the int8 text graph on some
builds, whose error straddles its 0.15 tolerance).

    python benchmarks/int8_parity_spread.py [--seeds 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.checkpoint import load_checkpoint  # noqa: E402
from training.cli import DEFAULT_WEIGHTS  # noqa: E402
from training.export import _export_graphs, parity_errors, quantize_int8  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    model, _ = load_checkpoint(Path(DEFAULT_WEIGHTS))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _export_graphs(model, folder)
        for graph in ("image", "text"):
            quantize_int8(folder / f"{graph}.onnx", folder / f"{graph}.int8.onnx")
        print("seed  text.cls  text.tokens  image.cls")
        for seed in range(args.seeds):
            e = parity_errors(model, folder / "image.int8.onnx", folder / "text.int8.onnx", seed)
            print(f"{seed:4d}  {e['text.cls']:.4f}    {e['text.tokens']:.4f}       {e['image.cls']:.4f}")


if __name__ == "__main__":
    main()
