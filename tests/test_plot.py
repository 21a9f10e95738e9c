"""`mlxtune plot RUN_DIR`: curves from metrics.jsonl into loss.png, one-line errors, and a plot
of a real tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_overrides
from PIL import Image

from mlxtune.cli import cli
from mlxtune.plot import plot_run

TRAIN_COLOUR = (31, 119, 180)  # matplotlib's C0, the train curves
VALID_COLOUR = (255, 127, 14)  # C1, the validation loss


def train_row(step: int) -> dict:
    return {"kind": "train", "step": step, "loss": 6.0 / step, "learning_rate": 2e-3 * step / 60,
            "tokens_per_s": 1400.0 + 10 * step, "real_token_share": 0.97,
            "peak_memory_gb": 0.77, "eta_s": 300.0 - step, "grad_norm": 1.1}  # fmt: skip


def write_run(folder: Path, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    return folder


def a_run(tmp_path: Path) -> Path:
    rows = [train_row(s) for s in range(10, 61, 10)]
    rows.insert(3, {"kind": "valid", "step": 30, "loss": 0.4, "perplexity": 1.5, "tokens": 308})
    rows.append({"kind": "valid", "step": 60, "loss": 0.2, "perplexity": 1.2, "tokens": 308})
    rows.append({"kind": "sample", "step": 60, "text": "not a curve"})  # unknown kinds are skipped
    return write_run(tmp_path / "run", rows, extra_lines=("",))


def colours(png: Path) -> set[tuple[int, int, int]]:
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert 600 <= img.width <= 1200 and 600 <= img.height <= 1200, img.size
        return {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}


def test_plot_run_draws_train_and_valid_curves(tmp_path):
    run = a_run(tmp_path)
    out = plot_run(run)
    assert out == run / "loss.png"
    seen = colours(out)
    assert len(seen) > 10  # not a blank canvas
    assert TRAIN_COLOUR in seen and VALID_COLOUR in seen
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temp left


def test_a_lone_train_row_still_plots(tmp_path):
    run = write_run(tmp_path / "run", [train_row(1)])
    seen = colours(plot_run(run))
    assert TRAIN_COLOUR in seen and VALID_COLOUR not in seen


def test_cli_prints_the_path_it_wrote(tmp_path):
    run = a_run(tmp_path)
    r = CliRunner().invoke(cli, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {run / 'loss.png'}\n"
    colours(run / "loss.png")


def test_cli_out_writes_elsewhere_in_the_format_of_its_suffix(tmp_path):
    run = a_run(tmp_path)
    out = tmp_path / "figures" / "curves.svg"
    r = CliRunner().invoke(cli, ["plot", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {out}\n"
    assert "<svg" in out.read_text()
    assert not (run / "loss.png").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing folder", "{run}: no such run folder"),
        ("no metrics", "{run}/metrics.jsonl: not found; is {run} a run folder?"),
        ("no train rows", "{run}/metrics.jsonl: no train rows to plot"),
        ("bad line", "{run}/metrics.jsonl:3: invalid JSON: Expecting value at column 1"),
        ("loss not a number", "{run}/metrics.jsonl:2: train row: loss: expected a number, got 'x'"),
        ("unknown format", "{run}/loss.xyz: unknown image format .xyz; use .png, .svg or .pdf"),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, case, message):
    run = tmp_path / "run"
    args = ["plot", str(run)]
    if case == "no metrics":
        run.mkdir()
    elif case == "no train rows":
        write_run(run, [{"kind": "valid", "step": 5, "loss": 1.0, "perplexity": 2.7, "tokens": 9}])
    elif case == "bad line":
        write_run(run, [train_row(1), train_row(2)], extra_lines=("oops",))
    elif case == "loss not a number":
        write_run(run, [train_row(1), {**train_row(2), "loss": "x"}])
    elif case == "unknown format":
        a_run(tmp_path)
        args += ["--out", str(run / "loss.xyz")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"mlxtune: error: {message.format(run=run)}"]
    assert "Traceback" not in r.output and r.stdout == ""
    assert not run.exists() or [p.name for p in run.iterdir()] in ([], ["metrics.jsonl"])


def test_without_matplotlib_it_says_how_to_install_it(tmp_path):
    run = a_run(tmp_path)
    code = (
        "import sys\nsys.modules['matplotlib'] = None  # as if not installed\n"
        f"from mlxtune.cli import main\nmain(['plot', {str(run)!r}])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        "mlxtune: error: matplotlib is not installed: pip install 'mlxtune[plot]'"
    ]
    assert r.stdout == "" and not (run / "loss.png").exists()


def test_plots_a_real_tiny_run(tiny, tmp_path):
    from mlxtune.config import load_config
    from mlxtune.trainer import train

    rows = [
        {"messages": [{"role": "user", "content": f"Say the word number {i}."},
                      {"role": "assistant", "content": f"word{i % 3}"}]}
        for i in range(8)
    ]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = run_overrides(tiny("llama"), tmp_path / "run", f"data.train={data}",
                              f"data.valid={data}", "train.iters=6", "train.eval_every=3",
                              "train.save_every=0")  # fmt: skip
    run = train(load_config(None, overrides), echo=lambda line: None)
    r = CliRunner().invoke(cli, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {run / 'loss.png'}\n"
    seen = colours(run / "loss.png")
    assert len(seen) > 10 and TRAIN_COLOUR in seen and VALID_COLOUR in seen
