"""`emkum`: train, export, evaluate, serve, index and search from one command line.

Training commands import torch lazily, inside the command, so the serving commands (and the
serving Docker image) never need it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="EMKUM retrieval: fine-grained image search by text.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """EMKUM retrieval: train and export a model, index a collection, serve and search it."""


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs with dotted keys (`loss.kd=0`) and JSON values where they parse."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="training config (.toml or .yaml)")],
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: --set loss.kd=0")] = [],  # noqa: B006
) -> None:
    """Train (distil) an EMKUM model. Runs on GPU when there is one; use torchrun for several."""
    from training.config import TrainConfig, load_train_config
    from training.loop import train as run

    cfg = load_train_config(config)
    cfg = TrainConfig.model_validate(_merge(cfg.model_dump(), parse_overrides(set_)))
    summary = run(cfg)
    typer.echo(json.dumps({"best": summary["best"], "seconds": summary["seconds"]}, indent=2))


if __name__ == "__main__":
    app()
