"""Progress on the console and in metrics.jsonl: the same numbers in both places.

A console line looks like

    step  40/200 [####----------------]  loss 2.314  lr 1.9e-04  1,234 tok/s  real 97.1%
        eta 0:02:10  peak 3.21 GB

and every report is also one JSON object per line in `metrics.jsonl` in the run folder.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path


def bar(done: int, total: int, width: int = 20) -> str:
    filled = min(width, round(width * done / max(total, 1)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def clock(seconds: float) -> str:
    s = max(int(seconds), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Reporter:
    """Writes metrics rows and prints progress; `echo` receives each console line. With
    `write=False` (data-parallel ranks other than 0) it writes no metrics file."""

    def __init__(self, metrics_path: Path, total_steps: int, echo: Callable[[str], None] | None,
                 write: bool = True):  # fmt: skip
        self.path, self.total, self.write = Path(metrics_path), total_steps, write
        self.echo = echo if echo is not None else (lambda line: print(line, file=sys.stderr))

    def log(self, row: dict) -> None:
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def train(self, step: int, loss: float, lr: float, tokens_per_s: float, real: float,
              peak_gb: float, seconds_per_step: float, **extra) -> None:  # fmt: skip
        """One training report; the ETA comes from the latest window's pace."""
        eta = seconds_per_step * (self.total - step)
        row = {"kind": "train", "step": step, "loss": round(loss, 6), "learning_rate": lr,
               "tokens_per_s": round(tokens_per_s, 1), "real_token_share": round(real, 4),
               "peak_memory_gb": round(peak_gb, 3), "eta_s": round(eta, 1), **extra}  # fmt: skip
        self.log(row)
        self.echo(
            f"step {step:>{len(str(self.total))}}/{self.total} {bar(step, self.total)}  "
            f"loss {loss:.3f}  lr {lr:.1e}  {tokens_per_s:,.0f} tok/s  real {real:.1%}  "
            f"eta {clock(eta)}  peak {peak_gb:.2f} GB"
        )

    def valid(self, step: int, loss: float, perplexity: float, tokens: int) -> None:
        self.log({"kind": "valid", "step": step, "loss": round(loss, 6),
                  "perplexity": round(perplexity, 4), "tokens": tokens})  # fmt: skip
        self.echo(f"step {step}: validation loss {loss:.3f}  perplexity {perplexity:.2f}")


METRICS = "metrics.jsonl"  # a run folder's metrics, one JSON row per report


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` (a resumed run redoes those steps)."""
    kept = read_metrics(path, up_to_step=step)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The rows of a metrics.jsonl, optionally only those at or before a step."""
    if not Path(path).is_file():
        return []
    rows = [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


WINDOW_KEYS = ("loss", "tokens", "real", "slots", "steps")


def new_window(saved: dict | None = None) -> dict:
    """Running sums between two progress reports; `saved` (a checkpoint's) restarts them where
    the stopped run left them, so the next report averages the same steps as a straight run."""
    saved = saved or {}
    window = {k: saved.get(k, 0) for k in WINDOW_KEYS} | {
        k: v for k, v in saved.items() if k not in WINDOW_KEYS and k != "elapsed"
    }  # and any other running sum a method keeps (preference metrics)
    window["loss"] = float(window["loss"])
    window["t0"] = time.perf_counter() - saved.get("elapsed", 0.0)
    return window


def saved_window(window: dict) -> dict:
    """What a checkpoint keeps of the running sums (plain numbers)."""
    out = {k: float(v) if k == "loss" else v for k, v in window.items() if k != "t0"}
    out["elapsed"] = time.perf_counter() - window["t0"]
    return out
