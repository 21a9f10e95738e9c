"""The notebooks: stored without outputs, and each runs top to bottom through notebooks/run.py,
the code path of `make notebooks`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def runner():
    spec = importlib.util.spec_from_file_location("notebooks_run", ROOT / "notebooks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_without_outputs_for_the_python3_kernel(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {index}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    # A key in the environment switches 03_fusion to real models; tests stay offline.
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    run = runner()
    source = path.read_bytes()
    try:
        run.execute(path, out_dir=tmp_path)
    except run.NotebookFailed as failed:
        pytest.fail(str(failed), pytrace=False)
    assert (tmp_path / path.name).is_file() and path.read_bytes() == source  # never modified


def test_a_failing_cell_is_named_by_notebook_index_and_last_line(tmp_path):
    pytest.importorskip("nbclient")
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook(cells=[new_markdown_cell("# broken"), new_code_cell("x = 1"),
                             new_code_cell("raise ValueError('first\\nlast line')")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})  # fmt: skip
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    run = runner()
    with pytest.raises(run.NotebookFailed) as failed:
        run.execute(path, out_dir=tmp_path / "out")
    assert (failed.value.name, failed.value.index) == ("broken.ipynb", 2)
    assert failed.value.line == "ValueError: last line"
    assert (tmp_path / "out" / "broken.ipynb").is_file()  # the executed copy, for a look
