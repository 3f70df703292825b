from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "not ready, and why"}})
def readyz(request: Request) -> JSONResponse:
    """The model and the index are loaded (503 until then, or with the reason loading failed)."""
    state = request.app.state.emkum
    body = {"status": "ready" if state.ready else "not_ready"}
    if state.ready:
        body.update(
            model=state.card["name"],
            provider=state.encoders.provider,
            precision=state.encoders.precision,
            items=len(state.store),
            index_on_gpu=state.store.gpu,
            read_only=state.store.read_only,
            cls_factory=state.settings.cls_factory,
            patch_codec=state.store.config.patch_codec,
            patch_pool=state.store.config.patch_pool,
        )
        if hasattr(state.store, "shard_states"):  # emkum serve-cluster: asks every shard now
            body["shards"] = state.store.shard_states()
            body["items"] = len(state.store)
    elif state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=200 if state.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}},
)
def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
