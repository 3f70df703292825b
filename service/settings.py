"""All service configuration in one typed object: environment variables prefixed `EMKUM_`, or a
TOML file named by `EMKUM_CONFIG_FILE` (environment wins)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    # empty variables count as unset: compose passes `${EMKUM_X:-}` through for every knob
    model_config = SettingsConfigDict(env_prefix="EMKUM_", extra="forbid", env_ignore_empty=True)

    model_dir: Path = Path("artifacts/emkum-flickr8k")
    data_dir: Path = Path("data/index")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: SecretStr | None = None  # guards the write endpoints when set
    protect_reads: bool = False  # the key guards search, embed and item reads too (not health/metrics)
    # Host headers served (names, or *.example.com); anything else gets 400 (DNS rebinding)
    allowed_hosts: list[str] = ["*"]
    # origins whose browser pages may POST/DELETE here (scheme://host:port); other sites get 403
    trusted_origins: list[str] = []

    providers: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: the fp16 graphs on CUDA when the model has them; on CPU the graphs model.json's
    # `cpu.precision` names (int8 for the default model: the fastest within its parity tolerance)
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default
    ort_spinning: bool = False  # ONNX Runtime threads busy-wait between calls (faster alone, slower beside FAISS)

    max_batch: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0)
    queue_size: int = Field(256, ge=1)
    # a request's deadline from its arrival: past it, the encoder wait ends (504) and no further
    # stage starts (503)
    request_timeout_s: float = Field(30.0, gt=0)
    # work that waited longer than this for an encoder or a search thread is refused with 503 +
    # Retry-After instead of being done late (load shedding; emkum_shed_total counts it)
    max_queue_wait_ms: float = Field(2000.0, gt=0)
    # the same bound for the image encoder, looser: uploads of many files queue for it by design
    # (on 2 CPU cores 4 clients posting 8 images each wait ~3 s), and queries by image share it
    max_image_queue_wait_ms: float = Field(20000.0, gt=0)
    # requests in flight at once (health, readiness and metrics aside); beyond: 503 at once
    max_in_flight: int = Field(256, ge=1)

    # a connection must send a whole request head this soon after connecting or after its last
    # response, or it is closed (slowloris); idle keep-alive connections close after idle_timeout_s
    header_timeout_s: float = Field(10.0, gt=0)
    idle_timeout_s: int = Field(5, ge=1)
    max_connections: int = Field(1024, ge=1)  # open at once; uvicorn answers 503 beyond

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    # all images of one request together: 64 files of 49 MP each took 29.5 s of CPU to decode
    max_request_pixels: int = 200_000_000
    # explain returns k x query vectors x item vectors similarities; an image query with k = 1000 was 1.35 GB
    max_explain_values: int = 5_000_000
    max_files: int = 64
    max_query_chars: int = 1000
    max_texts: int = 64
    max_k: int = 1000
    max_candidates: int = 10000

    search_threads: int = Field(0, ge=0)  # concurrent searches, one core each; 0 = the cores available
    # cores for the rerank of a search with no other request in flight; 0 = the cores available, 1 = always one
    lone_search_threads: int = Field(0, ge=0)
    cls_factory: str = "Flat"
    # None: what the data directory was written with; for a new one SQ8 and no pooling
    patch_codec: str | None = None  # SQ8, SQfp16 (exact to fp16), SQ4, PQ32x8, ...
    patch_pool: int | None = Field(None, ge=1)  # 2: average 2x2 patch cells (4x less memory and rerank work)
    codec_training_vectors: int = Field(65_536, ge=1)  # SQ8/SQ4/PQ learn from this many stored vectors
    use_gpu_index: bool = True
    snapshot_every: int = 5000
    disk_reserve_bytes: int = Field(8 * 2**20, ge=0)  # kept free so that DELETE works on a full disk
    thumbnail_size: int = 256

    # emkum serve-cluster: how long the ingress waits for a shard, and whether a search with a shard
    # down answers from the others (flagged `partial`, naming `missing_shards`) or is refused with 503
    shard_timeout_s: float = Field(10.0, gt=0)
    partial_results: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        config_file = os.environ.get("EMKUM_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)
