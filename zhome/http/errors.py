"""Matrix error responses.

Spec: client-server-api "Standard error response" and "Common error codes".
Every failure a client or a remote server can cause is raised as a
``MatrixError`` and rendered as ``{"errcode", "error", ...}`` with its status.
"""

from __future__ import annotations

from typing import Any


class MatrixError(Exception):
    def __init__(self, code: int, errcode: str, msg: str, **extra: Any) -> None:
        super().__init__(msg)
        self.code = code
        self.errcode = errcode
        self.msg = msg
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        d = {"errcode": self.errcode, "error": self.msg}
        d.update(self.extra)
        return d


def forbidden(msg: str = "Forbidden") -> MatrixError:
    return MatrixError(403, "M_FORBIDDEN", msg)


def guest_access_forbidden(msg: str = "Guest access is not allowed on this endpoint") -> MatrixError:
    return MatrixError(403, "M_GUEST_ACCESS_FORBIDDEN", msg)


def not_found(msg: str = "Not found") -> MatrixError:
    return MatrixError(404, "M_NOT_FOUND", msg)


def bad_json(msg: str) -> MatrixError:
    return MatrixError(400, "M_BAD_JSON", msg)


def not_json(msg: str = "Content not JSON.") -> MatrixError:
    return MatrixError(400, "M_NOT_JSON", msg)


def missing_param(msg: str) -> MatrixError:
    return MatrixError(400, "M_MISSING_PARAM", msg)


def invalid_param(msg: str) -> MatrixError:
    return MatrixError(400, "M_INVALID_PARAM", msg)


def unrecognized(code: int = 404, msg: str = "Unrecognized request") -> MatrixError:
    return MatrixError(code, "M_UNRECOGNIZED", msg)


def too_large(msg: str) -> MatrixError:
    return MatrixError(413, "M_TOO_LARGE", msg)


def not_yet_uploaded() -> MatrixError:
    return MatrixError(504, "M_NOT_YET_UPLOADED", "Content has not yet been uploaded")


def limit_exceeded(retry_after_ms: int) -> MatrixError:
    return MatrixError(429, "M_LIMIT_EXCEEDED", "Too many requests", retry_after_ms=retry_after_ms)
