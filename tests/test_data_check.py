"""`mlxtune data validate` and `mlxtune data stats`: good and deliberately broken files, token
lengths equal to the trainer's own encoding, packing as the trainer packs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _cli import mlxtune

from mlxtune import demo


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The demo's media task, small: pictures, tones and both, with real files."""
    return demo.write_media_task(tmp_path_factory.mktemp("check"), n_train=9, n_valid=3)[0]


@pytest.fixture(scope="module")
def broken(media):
    """The good rows plus one of each problem, in a file beside the media."""
    lines = media.read_text().splitlines()
    folder = media.parent
    (folder / "bad.png").write_bytes(b"not a picture")
    (folder / "cut.wav").write_bytes(Path(folder / "t0001.wav").read_bytes()[:30])

    def asked(kind: str, file: str, answer: str = "red") -> str:
        part = {"type": kind, kind: file}
        return json.dumps({"messages": [{"role": "user", "content": [part]},
                                        {"role": "assistant", "content": answer}]})  # fmt: skip

    long = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "long " * 1000}]}  # fmt: skip
    bad = [
        '{"messages": [',  # 10: invalid JSON
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # 11: role
        asked("image", "nowhere.png"),  # 12: missing
        asked("image", "bad.png"),  # 13: not a picture
        asked("audio", "cut.wav", "low"),  # 14: a cut clip
        json.dumps(long),  # 15: over max_seq_len
    ]
    path = folder / "broken.jsonl"
    path.write_text("\n".join(lines + bad) + "\n")
    return path


def test_a_good_file_validates_and_its_lengths_are_the_trainers(tiny, media):
    from mlxtune import trainer
    from mlxtune.config import load_config
    from mlxtune.data import check

    r = mlxtune("data", "validate", media, "--model", tiny("gemma4"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{media}: 9 rows, 9 ok, 0 with errors"]

    cfg = load_config(None, [f"model.path={tiny('gemma4')}", "data.max_seq_len=512"])
    report = check.check(media, cfg, check.tokenizing(cfg))
    dataset = trainer.setup(cfg).dataset(str(media))  # mlx-lm's tokenizer, the trainer's path
    assert report.lengths == [len(e) for e in dataset.examples]
    assert report.loss_tokens == dataset.stats.loss_tokens


def test_every_problem_is_one_line_with_file_and_line(tiny, broken):
    r = mlxtune("data", "validate", broken, "--model", tiny("gemma4"),
                "--set", "data.max_seq_len=800")  # fmt: skip
    assert r.returncode == 1, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"{broken}: 15 rows, 10 ok, 5 with errors, 1 over data.max_seq_len"
    problems = out[1:]
    assert [p.split(": ")[0] for p in problems] == [f"{broken}:{n}" for n in range(10, 16)]
    assert "invalid JSON" in problems[0]
    assert "messages[0].role: 'robot'" in problems[1]
    assert "messages[0].content[0].image: file not found" in problems[2]
    assert "bad.png: not an image file" in problems[3]
    assert "messages[0].content[0].audio:" in problems[4] and "cut.wav" in problems[4]
    assert "over data.max_seq_len 800 (training will have it truncated" in problems[5]
    assert "Traceback" not in r.stdout + r.stderr


def test_without_a_model_the_media_are_still_decoded(broken):
    r = mlxtune("data", "validate", broken)
    assert r.returncode == 1
    out = r.stdout.splitlines()
    assert out[0] == f"{broken}: 15 rows, 10 ok, 5 with errors"
    assert out[1].startswith("token lengths not checked")
    assert [p.split(": ")[0] for p in out[2:]] == [f"{broken}:{n}" for n in range(10, 15)]


def test_stats_counts_modalities_lengths_and_packing_as_the_trainer(tiny, media):
    from mlxtune.config import load_config
    from mlxtune.data import check
    from mlxtune.data.batching import Batching, plan_epoch

    r = mlxtune("data", "stats", media, "--model", tiny("gemma4"), "--set", "data.max_seq_len=1024")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"{media}: 9 rows (chat 9)"
    assert out[1] == "modalities: audio 3, audio+image 3, image 3; 6 clips; 6 pictures"

    cfg = load_config(None, [f"model.path={tiny('gemma4')}", "data.max_seq_len=1024"])
    lengths = np.array(check.check(media, cfg, check.tokenizing(cfg)).lengths)
    p50, p90 = np.percentile(lengths, [50, 90]).round().astype(int)
    assert f"min {lengths.min()}, p50 {p50}, p90 {p90}" in out[2]
    assert sum(int(line.split()[-1]) for line in out if line.startswith("  ")) == 9  # histogram
    packed = Batching(1024, True, tokens=cfg.train.batch_tokens)
    rows = sum(len(b) for b in plan_epoch(lengths - 1, packed, 0, 0))
    assert f"9 examples in {rows} packed rows of 1024" in r.stdout
    # the fill printed is the trainer's: tokens / slots of the batches it would run
    batches = plan_epoch(lengths - 1, Batching.of(cfg), 0, 0)
    slots = sum(
        len(b) * Batching.of(cfg).padded(max(sum(lengths[r] - 1) for r in b)) for b in batches
    )
    fill = (lengths - 1).sum() / slots
    assert f": {fill:.1%} of the slots hold tokens" in r.stdout


def test_stats_without_a_model_and_bad_config_keys(media, tmp_path):
    r = mlxtune("data", "stats", media)
    assert r.returncode == 0
    assert "token lengths: give a model" in r.stdout

    r = mlxtune("data", "validate", media, "--set", "data.max_seq_lne=64")
    assert r.returncode == 2
    assert "did you mean" in r.stderr and "Traceback" not in r.stderr
    r = mlxtune("data", "stats", tmp_path / "absent.jsonl")
    assert r.returncode == 2 and "file not found" in r.stderr


def test_long_files_show_progress_on_stderr(tmp_path):
    rows = tmp_path / "many.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(2500)))
    r = mlxtune("data", "validate", rows)
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == f"{rows}: 2500 rows, 2500 ok, 0 with errors"
    progress = r.stderr.splitlines()
    assert [line.split(" rows checked")[0] for line in progress] == ["1,000", "2,000"]


def test_media_need_a_model_whose_towers_the_backend_runs(tiny, media):
    """Llama 4 has a vision_config, but neither engine feeds it pictures; the CUDA twin takes
    Gemma 4's media, not Gemma 3n's: validate says so row by row, as training would."""
    r = mlxtune("data", "validate", media, "--model", tiny("llama4"))
    assert r.returncode == 1
    assert "parts need a multimodal model" in r.stdout.splitlines()[1]
    r = mlxtune(
        "data", "validate", media, "--model", tiny("gemma3n"), "--set", "model.backend=cuda"
    )
    assert r.returncode == 1 and "parts need a multimodal model" in r.stdout
