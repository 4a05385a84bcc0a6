"""Logging set-up: Twisted's events reach Python logging and are not kept."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = r"""
import io, logging, sys, tracemalloc
from zhome.logging_setup import setup_logging
from twisted.python import log as legacy
from twisted.logger import Logger

setup_logging("INFO", None, "text")
captured = io.StringIO()
logging.getLogger().handlers[0].stream = captured
Logger(namespace="zhome.test").warn("a twisted warning {n}", n=7)
legacy.msg("an info line the level filter drops")
tracemalloc.start()
for i in range(20000):
    legacy.msg("connection made", i)
    Logger().info("another event {i}", i=i)
kept, _ = tracemalloc.get_traced_memory()
print(kept)
print("warning seen" if "a twisted warning 7" in captured.getvalue() else "warning lost")
print("info dropped" if "info line" not in captured.getvalue() else "info printed")
"""


def test_twisted_events_go_to_python_logging_and_are_not_buffered() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept, warning, info = out.stdout.split("\n")[:3]
    # 40000 events: what Twisted keeps of them before logging begins grows with them.
    assert int(kept) < 50_000, kept
    assert warning == "warning seen"
    assert info == "info dropped"
