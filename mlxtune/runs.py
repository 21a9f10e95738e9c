"""The run folder and the step count, shared by both backends. Framework-free."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, TrainConfig
from .data.batching import Position
from .errors import ConfigError, ModelError
from .io import atomic_folder

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunState:
    step: int = 0  # optimizer steps completed
    position: Position = Position()  # the next micro-batch
    # The progress report's running sums since the last report (loss, tokens, real, slots,
    # steps, elapsed): a resumed run's next report averages the same steps as a straight run's.
    window: dict = field(default_factory=dict)
    # How the run was split: {"ranks": N, "batching": Batching.key()} (see distributed.py).
    layout: dict = field(default_factory=dict)


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written: the temp folders of checkpoints and of the
    final adapter (`atomic_folder`'s `.NAME.*`, and `.final`). Called when a run resumes."""
    run_dir = Path(run_dir)
    stale = [*run_dir.glob("..final.*"), *run_dir.glob(".final"),
             *(run_dir / CHECKPOINTS).glob(".step-*")]  # fmt: skip
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def all_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINTS
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def check_run_dir(cfg: Config, resume: bool) -> Path:
    """The run folder, if it may be used: empty, overwritable, or being resumed."""
    run_dir = Path(cfg.output.dir)
    if resume:
        if not all_checkpoints(run_dir):
            raise ModelError(f"{run_dir}: no checkpoint to resume from")
    elif run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.overwrite:
        raise ConfigError(
            f"output.dir: {run_dir} is not empty; resume it with --resume {run_dir} "
            "or set output.overwrite=true"
        )
    return run_dir


def total_steps(t: TrainConfig, micro_per_epoch: int) -> int:
    if t.iters:
        return t.iters
    return max(1, math.ceil((t.epochs or 1.0) * micro_per_epoch / t.grad_accum))


def write_final(run_dir: Path, write_adapter: Callable[[Path], None]) -> None:
    """The final adapter files into the run folder, each replaced atomically."""
    with atomic_folder(run_dir / ".final", replace=True) as tmp:
        write_adapter(tmp)
    for f in (run_dir / ".final").iterdir():
        f.replace(run_dir / f.name)
    (run_dir / ".final").rmdir()
