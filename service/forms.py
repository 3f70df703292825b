"""Multipart forms whose text fields must be UTF-8.

Why this exists: Starlette decodes a form field that is not valid UTF-8 as Latin-1 instead of
refusing it, so an id sent as raw bytes was stored as different text than the client meant, and a
later `GET /items/<id>` with the client's bytes never found it. The parser below decodes text fields
strictly and answers 400 naming the field; file parts are untouched. It plugs in through FastAPI's
documented custom `APIRoute`/`Request` hooks (https://fastapi.tiangolo.com/how-to/custom-request-and-route/)
and reuses Starlette's parser for everything else; only the one decode step differs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser


class _Utf8MultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except UnicodeDecodeError as exc:
                raise MultiPartException(f"form field {part.field_name!r} is not valid {self._charset}") from exc
        super().on_part_end()


class Utf8FormRequest(Request):
    async def _get_form(
        self, *, max_files: int | float = 1000, max_fields: int | float = 1000, max_part_size: int = 1024 * 1024
    ) -> FormData:
        if self._form is None and self.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            try:
                async with aclosing(self.stream()) as stream:
                    parser = _Utf8MultiPartParser(
                        self.headers, stream, max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
                    )
                    self._form = await parser.parse()
            except MultiPartException as exc:
                # fastapi's HTTPException is passed through by its body reader with this message,
                # where any other exception would become "There was an error parsing the body"
                raise HTTPException(status_code=400, detail=exc.message) from exc
        return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


class Utf8FormRoute(APIRoute):
    """The route class of every router that reads forms: forms are parsed with `Utf8FormRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_form_handler(request: Request) -> Response:
            return await handler(Utf8FormRequest(request.scope, request.receive))

        return strict_form_handler
