"""The installed `mlxtune` command, run as a user would (a subprocess with this environment)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXE = shutil.which("mlxtune", path=str(Path(sys.executable).parent)) or "mlxtune"


def mlxtune(*args) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))  # fmt: skip
