"""Run the notebooks top to bottom, as `make notebooks` does.

    python notebooks/run.py [NAME ...]     # default: every notebooks/*.ipynb, in name order

Each notebook runs in a fresh `python3` kernel whose working folder is notebooks/, as in Jupyter;
notebooks write what they make under runs/ (git-ignored) or a temporary folder. The executed copy
goes to runs/notebooks/<name>.ipynb; the sources are never modified. The first failing cell
stops the run with the notebook's name, the cell's index (from 0, over all cells, as nbformat
counts them) and the error's last line, and the exit status is 1.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "runs" / "notebooks"
CELL_TIMEOUT_S = 600
# The kernel is a subprocess: it gets the OpenBLAS preload here even when not started by `make`
# (mlx[cpu] on Linux bundles a reference BLAS ~50x slower).
OPENBLAS = Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3")


class NotebookFailed(Exception):
    def __init__(self, name: str, index: int | None, line: str):
        super().__init__(f"{name}: cell {index}: {line}")
        self.name, self.index, self.line = name, index, line


def notebooks(names: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The notebooks named (a path, a file name, or a name without .ipynb), or all of them."""
    if not names:
        return sorted(HERE.glob("*.ipynb"))
    paths = []
    for name in names:
        given = Path(name)
        found = [p for p in (given, HERE / given.name, HERE / f"{given.name}.ipynb") if p.is_file()]
        if not found:
            raise SystemExit(f"notebooks/run.py: {name}: no such notebook in {HERE}")
        paths.append(found[0].resolve())
    return paths


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    if sys.platform == "linux" and OPENBLAS.is_file() and str(OPENBLAS) not in preload:
        env["LD_PRELOAD"] = ":".join(p for p in (str(OPENBLAS), preload) if p)
    return env


def execute(path: Path, out_dir: Path = OUT) -> float:
    """Run one notebook; its executed copy goes to out_dir (also when a cell fails). Returns the
    seconds taken; raises NotebookFailed on the first failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    current: list[int | None] = [None]

    def started(cell, cell_index, **_) -> None:
        current[0] = cell_index

    # The kernel app's own warnings (plain-TCP transport on loopback) are noise here; a cell's
    # errors still come back in its outputs.
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            on_cell_start=started)  # fmt: skip
    start = time.perf_counter()
    try:
        client.execute(env=kernel_env(), cwd=str(path.parent))
    except Exception as e:
        raise NotebookFailed(path.name, current[0], _last_line(e)) from None
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    return time.perf_counter() - start


def _last_line(e: Exception) -> str:
    if getattr(e, "ename", None):  # nbclient's CellExecutionError: the kernel's exception
        lines = str(e.evalue).strip().splitlines()
        return f"{e.ename}: {lines[-1] if lines else ''}".rstrip(": ")
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    paths = notebooks(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(f"no notebooks in {HERE}")
    for path in paths:
        try:
            took = execute(path)
        except NotebookFailed as f:
            print(f"notebooks/run.py: FAILED {f}", file=sys.stderr)
            return 1
        print(f"{path.name}: {took:.1f} s -> {(OUT / path.name).relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
