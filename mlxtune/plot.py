"""`mlxtune plot RUN_DIR`: train and validation loss, learning rate and tokens/s against step,
drawn from the run's metrics.jsonl into RUN_DIR/loss.png.

Matplotlib is an optional extra (`pip install 'mlxtune[plot]'`) imported only when drawing, and
only through its object API (Figure + FigureCanvasAgg): no pyplot global state, no display, so
it works headless and in notebooks alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, MlxtuneError
from .io import atomic_files
from .progress import METRICS

DEFAULT_NAME = "loss.png"
NO_MATPLOTLIB = "matplotlib is not installed: pip install 'mlxtune[plot]'"


@dataclass
class Curve:
    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: float, value: float | None) -> None:
        if value is not None:
            self.steps.append(step)
            self.values.append(value)


@dataclass
class Curves:
    """The series of one run; a train row may lack the optional keys (older runs)."""

    train_loss: Curve = field(default_factory=Curve)
    valid_loss: Curve = field(default_factory=Curve)
    learning_rate: Curve = field(default_factory=Curve)
    tokens_per_s: Curve = field(default_factory=Curve)


def _number(row: dict, key: str, where: str, required: bool) -> float | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {row.get('kind')} row: {key}: expected a number, got {value!r}")
    return float(value)


def read_curves(path: Path) -> Curves:
    """Train and valid rows of a metrics.jsonl; rows of other kinds are skipped.

    Read with `json_lines` rather than progress.read_metrics, so a bad line is named file:line.
    """
    from .data.rows import json_lines

    curves = Curves()
    for row, where in json_lines(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        kind = row.get("kind")
        if kind not in ("train", "valid"):
            continue
        step = _number(row, "step", where, required=True)
        loss = _number(row, "loss", where, required=True)
        if kind == "valid":
            curves.valid_loss.add(step, loss)
            continue
        curves.train_loss.add(step, loss)
        curves.learning_rate.add(step, _number(row, "learning_rate", where, required=False))
        curves.tokens_per_s.add(step, _number(row, "tokens_per_s", where, required=False))
    if not curves.train_loss.steps:
        raise DataError(f"{path}: no train rows to plot")
    return curves


def title(run_name: str, curves: Curves) -> str:
    train = curves.train_loss
    text = f"{run_name}: train loss {train.values[-1]:.3f} at step {train.steps[-1]:g}"
    if curves.valid_loss.steps:
        valid = curves.valid_loss
        text += f", valid loss {valid.values[-1]:.3f} at step {valid.steps[-1]:g}"
    return text


def draw(curves: Curves, heading: str):
    """A Figure with three stacked panels sharing the step axis."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MlxtuneError(NO_MATPLOTLIB) from None

    fig = Figure(figsize=(8, 8), layout="constrained")
    loss_ax, lr_ax, tps_ax = fig.subplots(3, 1, sharex=True)
    panels = (
        (loss_ax, curves.train_loss, "loss", "train"),
        (lr_ax, curves.learning_rate, "learning rate", None),
        (tps_ax, curves.tokens_per_s, "tokens/s", None),
    )
    for ax, curve, label, legend in panels:
        # A lone point draws no line; give it a marker so it still shows.
        marker = "o" if len(curve.steps) == 1 else None
        ax.plot(curve.steps, curve.values, color="C0", linewidth=1.2, marker=marker, label=legend)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if curves.valid_loss.steps:
        valid = curves.valid_loss
        loss_ax.plot(valid.steps, valid.values, color="C1", marker="o", label="valid")
    loss_ax.legend()
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    tps_ax.set_xlabel("step")
    fig.suptitle(heading)
    return fig


def save(fig, out: Path) -> None:
    """Write through a temp file beside `out` and a rename: never a half-written image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in canvas.get_supported_filetypes():
        raise MlxtuneError(f"{out}: unknown image format .{fmt}; use .png, .svg or .pdf")
    with atomic_files(out) as (tmp,):
        fig.savefig(tmp, format=fmt, dpi=110)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR's metrics.jsonl into `out` (default RUN_DIR/loss.png); returns the path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run folder")
    metrics = run_dir / METRICS
    if not metrics.is_file():
        raise DataError(f"{metrics}: not found; is {run_dir} a run folder?")
    curves = read_curves(metrics)
    fig = draw(curves, title(run_dir.resolve().name, curves))
    out = Path(out) if out is not None else run_dir / DEFAULT_NAME
    save(fig, out)
    return out
