"""What the routes talk to in the cluster: the encoders and the store of a single process, each
answered by Serve deployments instead (same methods, same errors), so the FastAPI app and its routes
are the single-node ones, unchanged.

Blocking calls (`.result()`) are made only from worker threads, where the routes already run store
work; what the routes read on the event loop (the item count, whether writes are refused, the grid)
is kept here and refreshed by the calls that change it and by /readyz."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from index import DuplicateItem, ReadOnlyStore, UnknownItem
from index.sharding import merge_shard_hits, shard_candidates, shard_of
from index.store import ItemInput, Query, SearchHit
from service.errors import ApiError

log = logging.getLogger("emkum")

# what a shard raises for a bad request or a refused write: the client's business, passed on as the
# single-node service would (404, 409, 507, 422); anything else means the shard is unavailable
DOMAIN_ERRORS = (UnknownItem, DuplicateItem, ReadOnlyStore, ValueError)


class RemoteBatcher:
    """MicroBatcher's `submit`, answered by an encoder deployment (which batches with serve.batch)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    def submit(self, payload: Any) -> asyncio.Future:
        async def call() -> Any:
            return await self.handle.embed.remote(payload)

        return asyncio.ensure_future(call())


class RemoteEncoders:
    """`BatchedEncoders` as the routes use it: `image` and `text` batchers, `provider`, `precision`."""

    def __init__(self, image: DeploymentHandle, text: DeploymentHandle) -> None:
        self.image, self.text = RemoteBatcher(image), RemoteBatcher(text)
        info = image.info.remote().result()
        self.provider, self.precision = info["provider"], info["precision"]

    def close(self) -> None:
        pass


@dataclass
class StoreSettings:
    patch_codec: str
    patch_pool: int


class ShardHits(list):
    """A merged result list that knows which shards it lacks (empty: complete)."""

    missing_shards: list[int]

    def __init__(self, hits: list[SearchHit], missing: list[int]) -> None:
        super().__init__(hits)
        self.missing_shards = missing


def unwrap(exc: BaseException) -> BaseException:
    """The exception a shard raised, without Ray's wrapper (whose text is a remote traceback)."""
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


class ShardedStore:
    """`VectorStore`'s interface over the shard deployments: writes routed by `shard_of(id)`, searches
    fanned out and merged (index/sharding.py says why the merge equals one store's result)."""

    def __init__(
        self,
        shards: Sequence[DeploymentHandle],
        timeout_s: float,
        partial_results: bool,
        readers: Sequence[DeploymentHandle] | None = None,
    ) -> None:
        """`shards`: each shard's writer; `readers`: each shard's read replicas, which take the reads
        (the writer stands in when they do not answer)."""
        self.shards = list(shards)
        self.readers = list(readers) if readers else None
        self.timeout_s = timeout_s
        self.partial_results = partial_results
        self._pool = ThreadPoolExecutor(max(4, 2 * len(self.shards)), thread_name_prefix="shard-call")
        infos, missing = self._fan_out("info", writers=True)  # the writers say whether writes are refused
        if not infos:
            raise RuntimeError(f"no shard writer answered ({len(self.shards)} expected)")
        first = next(iter(infos.values()))
        self.grid: int | None = first["grid"]
        self.gpu: bool = any(i["index_on_gpu"] for i in infos.values())
        self.read_only: bool = any(i["read_only"] for i in infos.values())
        self.config = StoreSettings(first["patch_codec"], first["patch_pool"])
        self._counts = {s: i["items"] for s, i in infos.items()}
        if missing:
            log.warning("shard writers %s did not answer at start: serving the others", missing)

    # -- calls --------------------------------------------------------------------------------
    def _call(self, shard: int, method: str, *args: Any, handle: DeploymentHandle | None = None) -> Any:
        """One shard's answer (from its writer, or the handle given), its own errors raised as they
        are; unavailable: 503."""
        handle = handle or self.shards[shard]
        try:
            return getattr(handle, method).remote(*args).result(timeout_s=self.timeout_s)
        except Exception as exc:
            cause = unwrap(exc)
            if isinstance(cause, DOMAIN_ERRORS):
                raise cause from None
            log.warning("shard %d did not answer %s: %s", shard, method, type(cause).__name__)
            raise ApiError(
                503, "shard_unavailable", f"index shard {shard} is unavailable; retry shortly", {"Retry-After": "5"}
            ) from None

    def _read(self, shard: int, method: str, *args: Any) -> Any:
        """A read: from the shard's read replicas when it has them, else (or when they do not answer)
        from its writer."""
        if self.readers is not None:
            try:
                return self._call(shard, method, *args, handle=self.readers[shard])
            except ApiError:
                pass
        return self._call(shard, method, *args)

    def _fan_out(self, method: str, *args: Any, writers: bool = False) -> tuple[dict[int, Any], list[int]]:
        """Every shard's answer to the same read (from its writer only, if asked), side by side; the
        shards that gave none."""
        call = self._call if writers else self._read
        futures = {s: self._pool.submit(call, s, method, *args) for s in range(len(self.shards))}
        answers, missing = {}, []
        for shard, future in futures.items():
            try:
                answers[shard] = future.result()
            except ApiError:
                missing.append(shard)
        return answers, missing

    # -- what the routes read ---------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(self._counts.values())

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStore("a shard's data directory is read-only")

    def shard_states(self) -> list[dict[str, Any]]:
        """Each shard `up`, `reads_only` (its writer is down, its read replicas answer) or `down`;
        refreshes the item counts the routes read."""
        writers, _ = self._fan_out("info", writers=True)
        readers, _ = self._fan_out("info") if self.readers is not None else ({}, [])
        states = []
        for shard in range(len(self.shards)):
            info, state = (writers[shard], "up") if shard in writers else (readers.get(shard), "reads_only")
            if info is None:
                states.append({"shard": shard, "state": "down"})
                continue
            self._counts[shard] = info["items"]
            states.append({"shard": shard, "state": state, "items": info["items"], "node": info["node"]})
        return states

    # -- search -------------------------------------------------------------------------------
    def search(
        self,
        query: Query,
        k: int = 10,
        candidates: int = 100,
        rerank: bool = True,
        explain: bool = False,
        cls_weight: float = 0.0,
        timings: dict[str, float] | None = None,
        threads: int = 1,
    ) -> ShardHits:
        """Each shard's reranked top `candidates`, merged into the single store's top k. Shards that do
        not answer in time are left out and named (or the search is refused: EMKUM_PARTIAL_RESULTS)."""
        options = {
            "k": shard_candidates(k, candidates),
            "candidates": candidates,
            "rerank": rerank,
            "explain": explain,
            "cls_weight": cls_weight,
        }
        start = time.perf_counter()
        answers, missing = self._fan_out("search", query, options)
        if timings is not None:
            timings["shards"] = time.perf_counter() - start
        if missing and not (self.partial_results and answers):
            raise ApiError(
                503,
                "shards_unavailable",
                f"index shards {missing} of {len(self.shards)} are unavailable; retry shortly",
                {"Retry-After": "5"},
            )
        return ShardHits(merge_shard_hits(list(answers.values()), k, candidates), missing)

    # -- writes (each acknowledged only after its shard's durable commit) ------------------------
    def add(self, items: list[ItemInput]) -> list[str]:
        """Each item to its own shard, the shards side by side. Not atomic across shards: when one
        refuses or is down the request fails, while items already committed on the others stay
        (re-sending is safe: an id lands on the same shard and updates)."""
        groups: dict[int, list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault(shard_of(item.id, len(self.shards)), []).append(position)
        futures = {
            s: self._pool.submit(self._call, s, "add", [items[p] for p in positions]) for s, positions in groups.items()
        }
        statuses: list[str] = [""] * len(items)
        failure: BaseException | None = None
        for shard, future in futures.items():
            try:
                for position, status in zip(groups[shard], future.result(), strict=True):
                    statuses[position] = status
                self._counts[shard] = self._counts.get(shard, 0) + sum(statuses[p] == "created" for p in groups[shard])
            except Exception as exc:  # every shard's write is waited for before the first error is raised
                failure = failure or exc
        if failure is not None:
            raise failure
        return statuses

    def delete(self, item_id: str) -> None:
        shard = shard_of(item_id, len(self.shards))
        self._call(shard, "delete", item_id)
        self._counts[shard] = max(0, self._counts.get(shard, 1) - 1)

    def get(self, item_id: str) -> dict[str, Any]:
        return self._read(shard_of(item_id, len(self.shards)), "get", item_id)

    def __contains__(self, item_id: str) -> bool:
        try:
            self.get(item_id)
        except UnknownItem:
            return False
        return True

    def list(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Items shard by shard (each in its insertion order): offsets count through shard 0 first."""
        states = self.shard_states()
        if any(s["state"] == "down" for s in states):  # reads_only shards still list
            down = [s["shard"] for s in states if s["state"] == "down"]
            raise ApiError(503, "shards_unavailable", f"index shards {down} are unavailable", {"Retry-After": "5"})
        out: list[dict[str, Any]] = []
        for state in states:
            if len(out) >= limit:
                break
            count = state["items"]
            if offset >= count:
                offset -= count
                continue
            out += self._read(state["shard"], "page", limit - len(out), offset)
            offset = 0
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)
