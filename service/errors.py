"""One JSON error shape everywhere: {"error": {"code": ..., "message": ...}}, by exception handlers."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from index import DuplicateItem, ReadOnlyStore, UnknownItem
from runtime.errors import InputError
from service import metrics


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def without_paths(message: str, settings) -> str:
    """A message fit for a response: the configured data and model directories, absolute or as given,
    become $EMKUM_DATA_DIR / $EMKUM_MODEL_DIR. Where files live is the operator's business (the log
    keeps the full text), not any client's."""
    for folder, name in ((settings.data_dir, "$EMKUM_DATA_DIR"), (settings.model_dir, "$EMKUM_MODEL_DIR")):
        for form in sorted({str(Path(folder).resolve()), str(folder)}, key=len, reverse=True):
            if form not in ("", "."):
                message = message.replace(form, name)
    return message


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    metrics.ERRORS.labels(code).inc()
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (RFC 9110's Allow). Routers included
    with `include_router` nest their routes, so each method is put to the top-level routes' own
    `matches` rather than read off route objects."""
    routes = request.app.router.routes
    return [m for m in HTTP_METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


# the HTTP status of each runtime InputError code (runtime/images.py)
INPUT_STATUS = {
    "empty_file": 400,
    "invalid_image": 400,
    "image_too_large": 413,
    "too_many_pixels": 413,
    "request_too_many_pixels": 413,
    "unsupported_format": 415,
}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input(_: Request, exc: InputError) -> JSONResponse:
        return error_response(INPUT_STATUS.get(exc.code, 422), exc.code, exc.message)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path can have several
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(UnknownItem)
    async def _unknown(_: Request, exc: UnknownItem) -> JSONResponse:
        return error_response(404, "unknown_id", str(exc.args[0]))

    @app.exception_handler(DuplicateItem)
    async def _duplicate(_: Request, exc: DuplicateItem) -> JSONResponse:
        return error_response(422, "duplicate_id", str(exc.args[0]))

    @app.exception_handler(ReadOnlyStore)
    async def _readonly(request: Request, exc: ReadOnlyStore) -> JSONResponse:
        message = without_paths(str(exc), request.app.state.emkum.settings)
        return error_response(507, "storage_unavailable", f"writes are refused, search still works: {message}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server kept running")
