"""Logging set-up: readable text lines or one JSON object per line.

Fields passed with ``extra=`` (request method, endpoint, status, duration)
become keys of the JSON object, so log collectors can index them. Nothing
here logs request bodies, query strings or tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional, cast

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, log_file: Optional[str], fmt: str) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = __import__("time").gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Twisted's own log goes through Python logging, warnings and up only:
    # its access log would print full URIs.
    logging.getLogger("twisted").setLevel(logging.WARNING)
    _begin_twisted_logging()


_twisted_logging_begun = False


def _begin_twisted_logging() -> None:
    """Send Twisted's log events to Python logging, and end Twisted's start-up
    buffering: until a program "begins logging", Twisted keeps every event in
    memory (up to 65536 of them, many MB on a busy server) to replay later."""
    global _twisted_logging_begun
    if _twisted_logging_begun:
        return
    from twisted.logger import ILogObserver, STDLibLogObserver, globalLogBeginner

    observer = cast(ILogObserver, STDLibLogObserver(name="twisted"))
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True,
                                     redirectStandardIO=False)
    _twisted_logging_begun = True
