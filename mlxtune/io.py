"""Writing without half-written results: build in a temp folder beside the target, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it becomes `target` (replacing it if `replace`)."""
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not replace:
        raise FileExistsError(f"{target}: folder exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(*targets: Path) -> Iterator[list[Path]]:
    """Yield a temp path beside each target; on success each is renamed onto its target, on an
    error all are removed: either every file is written or none is."""
    temps = []
    try:
        for target in map(Path, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            os.chmod(tmp, 0o644)
            temps.append(Path(tmp))
        yield temps
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    """Write JSON through a temp file and a rename."""
    with atomic_files(path) as (tmp,):
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
