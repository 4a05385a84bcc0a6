"""zhome/ is mypy clean (DESIGN.md: "type hints everywhere, mypy clean").

Runs mypy with the repository's configuration (setup.cfg, ``[mypy]``) the way
a developer would: ``python -m mypy zhome`` from the repository root. mypy is
pinned in requirements-test.txt, so a missing mypy is a failure, not a skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_zhome_is_mypy_clean() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg"), "zhome"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"mypy failed (exit {proc.returncode}):\n{output}"
