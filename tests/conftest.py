"""Session fixtures: tiny checkpoints made once, and short training runs cached by settings."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory):
    """Prepared copies (cuda backend) go to a temp folder, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLXTUNE_CACHE", str(tmp_path_factory.mktemp("mlxtune-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch) -> path of a seed-0 tiny checkpoint, made on first use."""
    from mlxtune.tiny import make_tiny

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny(root / arch, arch, seed=0)
        return made[arch]

    return get


def run_overrides(model: Path, out: Path, *extra: str) -> list[str]:
    """A short run on the chat fixture data; `extra` are more --set style overrides."""
    return [
        f"model.path={model}",
        f"output.dir={out}",
        f"data.train={DATA / 'chat_train.jsonl'}",
        f"data.valid={DATA / 'chat_valid.jsonl'}",
        "data.max_seq_len=128",
        "lora.rank=4",
        "lora.alpha=8",
        "train.iters=8",
        "train.batch_size=2",
        "train.learning_rate=1e-2",
        "train.report_every=1",
        "train.eval_every=0",
        "train.save_every=4",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """trained(arch, *overrides) -> run folder of a short training run, cached per arguments."""
    from mlxtune.config import load_config
    from mlxtune.trainer import train

    runs: dict[tuple, Path] = {}

    def get(arch: str, *extra: str) -> Path:
        key = (arch, *extra)
        if key not in runs:
            out = tmp_path_factory.mktemp("run") / "run"
            cfg = load_config(None, run_overrides(tiny(arch), out, *extra))
            runs[key] = train(cfg, echo=lambda line: None)
        return runs[key]

    return get


def straight_and_resumed(config, tmp_path, keys: tuple[str, ...]):
    """A straight run of `config(out)`, and the same run stopped after step 6 and resumed:
    (straight folder, resumed folder, the resumed run's lines, both runs' metrics curves of
    (step, *keys))."""
    import pytest

    from mlxtune import trainer
    from mlxtune.progress import read_metrics

    straight = trainer.train(config(tmp_path / "a"), echo=lambda line: None)

    def stop_after_step_6(line):
        if line.startswith("step 6/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(tmp_path / "b"), echo=stop_after_step_6)
    lines: list[str] = []
    resumed = trainer.train(config(tmp_path / "b"), resume=True, echo=lines.append)

    def curve(run):
        rows = read_metrics(run / "metrics.jsonl")
        return [(r["step"], *(r[k] for k in keys)) for r in rows if r["kind"] == "train"]

    return straight, resumed, lines, curve(straight), curve(resumed)
