"""The machine we run on: BLAS under mlx[cpu] on Linux, memory, devices. Used by the CLI and doctor.

The `mlx[cpu]` Linux wheel bundles a reference BLAS (`mlx_cpu.libs/libblas-*.so`) that is ~50x
slower than OpenBLAS on matmuls. Preloading Debian's `libopenblas0-pthread` replaces its symbols,
so MLX commands re-execute themselves with `LD_PRELOAD` set when that library is present.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

NO_REEXEC = "MLXTUNE_NO_REEXEC"  # set to 1 to keep the bundled BLAS (and to stop loops)
APT_HINT = "sudo apt-get install libopenblas0-pthread"


def openblas_path() -> Path | None:
    """Debian/Ubuntu's multiarch OpenBLAS (pthread flavour), if installed."""
    path = Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3")
    return path if path.exists() else None


def bundled_blas() -> Path | None:
    """The reference BLAS shipped in the mlx[cpu] wheel, found without importing mlx."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "mlx_cpu.libs"
    found = sorted(libs.glob("libblas*.so*")) if libs.is_dir() else []
    return found[0] if found else None


def openblas_preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def use_fast_blas(argv: list[str]) -> str | None:
    """Before an MLX command on Linux: re-exec with OpenBLAS preloaded, or return a one-line hint.

    Returns None when nothing needs saying (not Linux, already preloaded, no bundled BLAS).
    """
    if not sys.platform.startswith("linux") or openblas_preloaded() or bundled_blas() is None:
        return None
    lib = openblas_path()
    if lib is None:
        return (
            "note: MLX is using its bundled reference BLAS (~50x slower matmuls); "
            f"for OpenBLAS run: {APT_HINT}"
        )
    if os.environ.get(NO_REEXEC):
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    env[NO_REEXEC] = "1"  # the child must never re-exec again
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mlxtune", *argv], env)
    return None  # not reached


def blas_in_use() -> str:
    """Which BLAS libraries this process has mapped (call after MLX ran a matmul)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower()}
    except OSError:
        return "unknown (no /proc/self/maps)"
    if any("openblas" in lib for lib in libs):
        return "OpenBLAS (preloaded)"
    if any("mlx_cpu.libs" in lib for lib in libs):
        lib = openblas_path()
        fix = f"LD_PRELOAD={lib} or unset {NO_REEXEC}" if lib else APT_HINT
        return f"bundled reference BLAS (~50x slower; {fix})"
    return ", ".join(sorted(libs)) or "none loaded"


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) system memory; on Apple Silicon this is the unified GPU memory too."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        total = pages * size
    except (ValueError, OSError, AttributeError):
        total = None
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, available


def free_disk_bytes(path: str | Path = ".") -> int:
    return shutil.disk_usage(path).free


def gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"
