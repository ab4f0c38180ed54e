"""HTTP error answers of `dcfeat serve`: `Problem` (status, code, one message that says what to fix), as the
JSON body every error has, as an ASGI response, as raw HTTP/1.1 bytes (for the connection guard, below the
application), and `ErrorMiddleware`, which turns a bug into a JSON 500 with its traceback in the log."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi.responses import JSONResponse

LOG = logging.getLogger("dcfeat.serve")


class Problem(Exception):
    """An HTTP error answer: its status, a short code and one message that says what to fix."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}

    def encoded(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


def error_response(problem: Problem, extra: dict | None = None) -> JSONResponse:
    """A Problem as the JSON response a route returns; `extra`: members beside `error` (a GeoPoseResp's id, …)."""
    return JSONResponse({**(extra or {}), **problem.body()}, status_code=problem.status, headers=problem.headers)


def raw_response(problem: Problem) -> bytes:
    """A Problem as a whole HTTP/1.1 response that closes the connection: what the connection guard writes
    itself, below the application."""
    body = problem.encoded()
    head = [f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in problem.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def send_problem(send, problem: Problem) -> None:
    """A Problem as an ASGI response (for the layers under FastAPI's own handlers)."""
    body = problem.encoded()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), str(v).encode()) for k, v in problem.headers.items())]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ErrorMiddleware:
    """An exception no handler expected (a bug) becomes a JSON 500 naming where to look, its traceback in the
    server's log; under MetricsMiddleware, which counts it as the 500 it is."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"yes": False}

        async def sending(message):
            started["yes"] = started["yes"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - answered here, logged with its traceback
            LOG.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started["yes"]:  # the answer is half sent: the connection is all there is left to close
                raise
            await send_problem(send, Problem(500, "internal_error", f"the server failed on this request ({type(e).__name__}); "
                                      "its traceback is in the server log. Please report it"))
