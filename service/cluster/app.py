"""`emkum serve-cluster`: the encoders, N shards and the ingress as Ray Serve applications.

The ingress is the single-node FastAPI app (`service.app.create_app`: the same routes, guards, API
key, error shapes and /metrics), built on each ingress replica with `cluster_backends` in place of
the local encoders and store. Serve's proxy takes HTTP on the given port and spreads requests over
the ingress replicas."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from runtime.modelcard import load_model_card
from service.app import create_app
from service.cluster.deployments import ImageEncoder, Shard, TextEncoder, reader_app_name, shard_app_name
from service.cluster.remote import RemoteEncoders, ShardedStore
from service.deps import AppState
from service.settings import Settings

log = logging.getLogger("emkum")
INGRESS_APP = "emkum"

# Ray CPUs each replica reserves: the encoders do the heavy work; a shard's search is one core's
# work for a moment; the ingress mostly waits on the others
ENCODER_CPUS, SHARD_CPUS, INGRESS_CPUS = 0.5, 0.25, 0.25


def shard_dir(data_dir: Path, shard: int) -> Path:
    """Where shard i keeps its data: the layout `emkum bulk-index --shards N` writes."""
    return Path(data_dir) / f"shard-{shard:02d}"


def cluster_backends(
    state: AppState,
    card: dict,
    shards: int,
    readers: bool,
    image: DeploymentHandle,
    text: DeploymentHandle,
) -> tuple[RemoteEncoders, ShardedStore]:
    s = state.settings
    writers = [serve.get_app_handle(shard_app_name(i)) for i in range(shards)]
    followers = [serve.get_app_handle(reader_app_name(i)) for i in range(shards)] if readers else None
    return RemoteEncoders(image, text), ShardedStore(writers, s.shard_timeout_s, s.partial_results, followers)


@serve.deployment(ray_actor_options={"num_cpus": INGRESS_CPUS}, max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    def __init__(
        self, settings: dict[str, Any], shards: int, readers: bool, image: DeploymentHandle, text: DeploymentHandle
    ) -> None:
        self.settings = Settings(**settings)
        self.backends = functools.partial(cluster_backends, shards=shards, readers=readers, image=image, text=text)

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, self.backends)


def store_options(settings: Settings) -> dict[str, Any]:
    return {
        "cls_factory": settings.cls_factory,
        "patch_codec": settings.patch_codec,
        "use_gpu": settings.use_gpu_index,
        "snapshot_every": settings.snapshot_every,
        "patch_pool": settings.patch_pool,
        "codec_training_vectors": settings.codec_training_vectors,
        "disk_reserve_bytes": settings.disk_reserve_bytes,
    }


def deploy_shard(settings: Settings, shard: int, readers: int = 0) -> DeploymentHandle:
    """Deploy (or redeploy) shard i on its data directory, created empty when it does not exist, and
    `readers` read replicas of it (after the writer: a follower opens a directory the writer made).

    Placement: a node started with the custom resource `emkum-shard-<i>` (`ray start --resources
    '{"emkum-shard-0": 1}'`) is where shard i's replicas must run - the node whose disk holds its
    directory. Without one, Ray places them anywhere, which needs the directory on storage every
    node mounts."""
    directory = shard_dir(settings.data_dir, shard)
    pin = shard_app_name(shard)
    actor = {"num_cpus": SHARD_CPUS, "resources": {pin: 0.01} if pin in ray.cluster_resources() else {}}
    args = (shard, str(directory.resolve()), str(Path(settings.model_dir).resolve()), store_options(settings))
    handle = serve.run(Shard.options(ray_actor_options=actor).bind(*args), name=pin, route_prefix=None)
    if readers:
        follower = Shard.options(name="ShardReader", num_replicas=readers, ray_actor_options=actor)
        serve.run(follower.bind(*args, follow=True), name=reader_app_name(shard), route_prefix=None)
    return handle


def required_cpus(shards: int, replicas: int = 1, shard_readers: int = 0) -> float:
    """The Ray CPUs a deployment of this shape reserves (Serve will not schedule past them)."""
    return 2 * replicas * ENCODER_CPUS + shards * (1 + shard_readers) * SHARD_CPUS + replicas * INGRESS_CPUS


def start_cluster(
    settings: Settings, shards: int, replicas: int = 1, shard_readers: int = 0, gpus: float | None = None
) -> None:
    """Everything on the Ray cluster this process is connected to (ray.init first); returns once the
    ingress is ready. `shard_readers`: read replicas per shard (0: the writer serves reads too).
    `gpus`: per encoder replica (None: one each when the cluster has GPUs)."""
    need, have = required_cpus(shards, replicas, shard_readers), ray.cluster_resources().get("CPU", 0)
    if have < need:
        raise RuntimeError(
            f"{shards} shards x {1 + shard_readers} replicas and {replicas} encoder/ingress replicas reserve "
            f"{need:g} Ray CPUs; this cluster has {have:g}: add nodes, or start Ray with --num-cpus {need:g}"
        )
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    serve.start(http_options={"host": settings.host, "port": settings.port})
    for shard in range(shards):
        deploy_shard(settings, shard, shard_readers)
    model_dir = str(Path(settings.model_dir).resolve())
    args = (model_dir, settings.providers, settings.precision, settings.intra_op_threads)
    encoder = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": ENCODER_CPUS, "num_gpus": gpus}}
    image = ImageEncoder.options(**encoder).bind(*args)
    text = TextEncoder.options(**encoder).bind(*args)
    card = load_model_card(Path(model_dir))
    log.info("deploying %s over %d shards, %d replicas per encoder", card["name"], shards, replicas)
    config = settings.model_dump(mode="json", exclude_none=True)
    config.update(model_dir=model_dir, data_dir=str(Path(settings.data_dir).resolve()))  # replicas' cwd differs
    config["api_key"] = settings.api_key.get_secret_value() if settings.api_key else None
    config = {k: v for k, v in config.items() if v is not None}
    ingress = Ingress.options(num_replicas=replicas).bind(config, shards, shard_readers > 0, image, text)
    serve.run(ingress, name=INGRESS_APP, route_prefix="/")
