"""`emkum`: serve, index and search here; train, export and evaluate from plugins.

Commands from other packages come in through the `emkum.commands` entry point group (training's
are in `training/cli.py`), loaded only when one of them is asked for or the commands are listed:
this package never imports training, and `emkum serve` never loads it. An install without the
training package (the serving Docker image) has the serving commands only."""

from __future__ import annotations

import json
import logging
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

log = logging.getLogger(__name__)
PLUGIN_GROUP = "emkum.commands"


@cache
def plugin_commands() -> dict[str, TyperCommand]:
    """Every installed plugin's commands by name (each entry point names a `typer.Typer`). A plugin
    whose package is not installed (its entry point outlives it in the metadata, as in the serving
    image) is skipped; any other import error is a bug in the plugin and is raised."""
    found: dict[str, TyperCommand] = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            plugin = ep.load()
        except ModuleNotFoundError as exc:
            if exc.name != ep.module.split(".")[0]:
                raise
            log.debug("emkum plugin %s skipped: %s is not installed", ep.name, exc.name)
            continue
        found.update(typer.main.get_group(plugin).commands)
    return found


class PluginGroup(TyperGroup):
    """The serving commands first; the plugins' only when a name is not one of ours (so `emkum serve`
    imports no plugin) or when the commands are listed for --help."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        own = super().list_commands(ctx)
        return [*own, *(name for name in plugin_commands() if name not in own)]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | None:
        return super().get_command(ctx, cmd_name) or plugin_commands().get(cmd_name)


app = typer.Typer(help="EMKUM retrieval: fine-grained image search by text.", no_args_is_help=True, cls=PluginGroup)


@app.callback()
def main() -> None:
    """EMKUM retrieval: train and export a model, index a collection, serve and search it."""


def _settings(**overrides):
    from service.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def serve(
    model_dir: Annotated[Path | None, typer.Option(help="exported model (default: EMKUM_MODEL_DIR)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="index data directory")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Start the HTTP service (settings from EMKUM_* environment variables; options override them)."""
    from service.app import create_app
    from service.server import serve as run_server

    settings = _settings(model_dir=model_dir, data_dir=data_dir, host=host, port=port)
    run_server(create_app(settings), settings)


@app.command()
def healthcheck(
    port: Annotated[int | None, typer.Option(help="the service's port (default: EMKUM_PORT)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 4.0,
) -> None:
    """Exit 0 when the local service answers /readyz with 200, 1 otherwise: the images' HEALTHCHECK
    (they carry no curl, and this reads the port from the same settings the service does)."""
    import urllib.error
    import urllib.request

    settings = _settings(port=port)
    url = f"http://127.0.0.1:{settings.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            typer.echo(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        typer.echo(f"{url}: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command("index")
def index_folder(
    folder: Annotated[Path, typer.Argument(help="a folder of images, searched recursively")],
    model_dir: Annotated[Path | None, typer.Option(help="exported model")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="index data directory")] = None,
    batch: Annotated[int, typer.Option(help="images per encoder call and per durable write")] = 32,
) -> None:
    """Bulk-index a folder: ids are paths relative to FOLDER, already indexed ids are skipped (so an
    interrupted run resumes), bad files are reported and skipped. Stop the server first, or use POST /items."""
    from tqdm import tqdm

    from index.store import ItemInput
    from runtime.errors import InputError
    from runtime.images import find_images
    from runtime.ingest import commit, prepare_image
    from service.app import load_state
    from service.deps import AppState

    settings = _settings(model_dir=model_dir, data_dir=data_dir)
    state = AppState(settings=settings)
    load_state(state)
    files = find_images(folder)
    todo = [p for p in files if str(p.relative_to(folder)) not in state.store]
    spec = state.card["image"]
    bad: list[str] = []
    added = 0
    with tqdm(total=len(todo), desc="indexing", unit="img") as bar:
        for s in range(0, len(todo), batch):
            ids, ok = [], []
            for path in todo[s : s + batch]:
                try:
                    data = path.read_bytes()
                    limits = (settings.max_image_bytes, settings.max_image_pixels)
                    ok.append(prepare_image(data, path.name, spec, *limits, thumbnail_size=settings.thumbnail_size))
                    ids.append(str(path.relative_to(folder)))
                except (InputError, OSError) as exc:
                    bad.append(f"{path}: {exc}")
            if ok:
                embs = state.encoders.embed_images_now([p.pixels for p in ok])
                items = [ItemInput(i, e.cls, e.patches, {"filename": i}) for i, e in zip(ids, embs, strict=True)]
                commit(state.store, items, [p.thumbnail for p in ok], state.thumbs)
                added += len(ok)
            bar.update(len(todo[s : s + batch]))
    state.encoders.close()
    state.store.close()
    typer.echo(json.dumps({"indexed": added, "skipped_existing": len(files) - len(todo), "bad_files": bad}, indent=2))


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="what to look for")],
    k: Annotated[int, typer.Option("--k", "-k", help="results to show")] = 5,
    candidates: Annotated[int | None, typer.Option(help="CLS candidates to rerank; default: the model's own")] = None,
    rerank: Annotated[bool, typer.Option()] = True,
    model_dir: Annotated[Path | None, typer.Option()] = None,
    data_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Search the index from the command line (no server needed)."""
    from runtime.modelcard import rerank_defaults
    from runtime.query import embed_text_queries
    from service.app import load_state
    from service.deps import AppState

    state = AppState(settings=_settings(model_dir=model_dir, data_dir=data_dir))
    load_state(state)
    (text,) = embed_text_queries(state.tokenizer, state.encoders.embed_tokens_now, [query])
    defaults = rerank_defaults(state.card)
    candidates = candidates or defaults.candidates
    hits = state.store.search(text, k, candidates, rerank, cls_weight=defaults.cls_weight)
    state.encoders.close()
    for h in hits:
        typer.echo(f"{h.score:.4f}  {h.id}  {json.dumps(h.metadata)}")


@app.command("bulk-index")
def bulk_index_command(
    folder: Annotated[Path, typer.Argument(help="a folder of images, searched recursively")],
    out_dir: Annotated[Path, typer.Argument(help="where the index shards go (shard-00, shard-01, ...)")],
    model_dir: Annotated[Path, typer.Option(help="exported model")] = Path("artifacts/emkum-flickr8k"),
    shards: Annotated[int, typer.Option(min=1, help="index shards (items go to crc32(id) % shards)")] = 2,
    encoders: Annotated[int, typer.Option(min=1, help="encoder actors (one ONNX session each)")] = 1,
    gpus_per_encoder: Annotated[float, typer.Option(help="GPUs per encoder actor (0 = CPU)")] = 0.0,
    batch: Annotated[int, typer.Option(min=1)] = 32,
    codec: Annotated[str, typer.Option(help="patch codec of the shards")] = "SQ8",
    pool: Annotated[int, typer.Option(min=1, help="patch pooling factor of the shards")] = 1,
    address: Annotated[str | None, typer.Option(help="an existing Ray cluster (default: start a local one)")] = None,
) -> None:
    """Bulk-index a large folder on Ray Data: decoding on every CPU of the cluster, encoders as actors
    (on GPUs with --gpus-per-encoder 1), written to index shards the service can serve one by one."""
    import ray

    from service.bulk import bulk_index

    if address:
        ray.init(address=address)
    report = bulk_index(folder, out_dir, model_dir, shards, encoders, batch, gpus_per_encoder, codec=codec, pool=pool)
    typer.echo(json.dumps(report, indent=2))


@app.command("serve-cluster")
def serve_cluster(
    shards: Annotated[int, typer.Option(min=1, help="index shards (items go to crc32(id) % shards)")] = 2,
    replicas: Annotated[int, typer.Option(min=1, help="replicas of each encoder and of the HTTP ingress")] = 1,
    shard_replicas: Annotated[
        int, typer.Option(min=0, help="read replicas per shard (0: each shard's writer serves its reads)")
    ] = 0,
    address: Annotated[str | None, typer.Option(help="an existing Ray cluster (default: start a local one)")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="holds shard-00, shard-01, ... (empty or from emkum bulk-index)")
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(help="exported model")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Serve the same HTTP API from a Ray Serve cluster: encoder replicas, one deployment per index
    shard, searches fanned out and merged, writes routed to the id's shard. Runs until interrupted."""
    import os
    import signal
    import sys
    import time

    import ray

    from service.cluster.app import required_cpus, start_cluster

    settings = _settings(model_dir=model_dir, data_dir=data_dir, host=host, port=port)
    if address:
        ray.init(address=address)
    else:  # a local cluster reserves what the deployments need, however few cores there are
        need = required_cpus(shards, replicas, shard_replicas)
        ray.init(num_cpus=max(len(os.sched_getaffinity(0)), int(need + 0.999)))
    # after ray.init, whose own handler exits with status 15: docker stop and systemd shut Serve down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        start_cluster(settings, shards, replicas, shard_replicas)
        typer.echo(f"serving on http://{settings.host}:{settings.port} ({shards} shards); Ctrl-C or SIGTERM stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def demo_images() -> Path:
    """Real photographs that scikit-image ships in its wheel (no download)."""
    import skimage

    return Path(skimage.__file__).parent / "data"


@app.command()
def demo(
    folder: Annotated[Path | None, typer.Option(help="images to index (default: scikit-image's sample photos)")] = None,
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """The one-command demo: build the default model, index a collection, serve on localhost."""
    build_default = plugin_commands().get("build-default")
    if build_default is None:
        raise typer.BadParameter("building the default model needs the training package, which is not installed")
    build_default.main([], prog_name="emkum build-default", standalone_mode=False)
    index_folder(folder or demo_images())
    serve(port=port)


if __name__ == "__main__":
    app()
