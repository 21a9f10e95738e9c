"""`mlxtune data convert` and `mlxtune data split` on real files: each format to ours, round
trips, media paths across folders, one-line errors through the CLI, and the split's guarantees."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from PIL import Image

from mlxtune.cli import cli
from mlxtune.data.convert import convert, split
from mlxtune.data.rows import read_rows
from mlxtune.errors import DataError


def run(*args: str):
    return CliRunner().invoke(cli, ["data", *map(str, args)])


def fails(result, message: str) -> None:
    """Exit 2 with exactly one line, `mlxtune: error: <message>`, and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"mlxtune: error: {message}"]
    assert "Traceback" not in result.output and result.stdout == ""


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.zeros(1600, dtype=np.float32), 16000)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def user(content) -> dict:
    return {"role": "user", "content": content}


def reply(content: str) -> dict:
    return {"role": "assistant", "content": content}


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
    {"instruction": "Translate to French.", "input": "cat\n\ndog", "output": "chat\n\nchien"},
]


# ------------------------------------------------------------------------------- to ours


def test_alpaca_to_ours(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(ALPACA))
    r = run("convert", src, tmp_path / "out.jsonl", "--from", "alpaca")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"wrote 3 mlxtune rows to {tmp_path / 'out.jsonl'}: 3 text"
    assert lines(tmp_path / "out.jsonl") == [
        {"messages": [user("Add the numbers.\n\n2 + 3"), reply("5")]},
        {"messages": [{"role": "system", "content": "Be brief."}, user("Say hi."), reply("Hi!")]},
        {"messages": [user("Translate to French.\n\ncat\n\ndog"), reply("chat\n\nchien")]},
    ]


def test_alpaca_jsonl_with_missing_input(tmp_path):
    src = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a colour.", "output": "Red"}])
    convert(src, tmp_path / "out.jsonl", from_format="alpaca")
    assert lines(tmp_path / "out.jsonl") == [{"messages": [user("Name a colour."), reply("Red")]}]


def test_sharegpt_to_ours_places_media_at_markers(tmp_path):
    png(tmp_path / "img" / "a.png"), png(tmp_path / "img" / "b.png"), wav(tmp_path / "clip.wav")
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Look closely."},
                {"from": "human", "value": "Compare <image> with <image>."},
                {"from": "gpt", "value": "Both red."},
                {"from": "human", "value": "And this?"},
                {"from": "gpt", "value": "A silence."},
            ],
            "images": ["img/a.png", "img/b.png"],
            "audio": "clip.wav",  # no <audio> marker: goes before the first user text
        },
        {  # the role/content spelling, LLaVA's single "image" string
            "messages": [{"role": "user", "content": "<image>"}, {"role": "model", "content": "Red."}],
            "image": "img/a.png",
        },
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                {"from": "observation", "value": "sunny"},
                {"from": "gpt", "value": "Sunny."},
            ],
            "tools": '[{"name": "weather", "parameters": {}}]',
        },
    ]  # fmt: skip
    src = jsonl(tmp_path / "share.jsonl", rows)
    convert(src, tmp_path / "out.jsonl", from_format="sharegpt")
    img = {"type": "image", "image": "img/a.png"}
    assert lines(tmp_path / "out.jsonl") == [
        {"messages": [
            {"role": "system", "content": "Look closely."},
            user([{"type": "audio", "audio": "clip.wav"}, {"type": "text", "text": "Compare "}, img,
                  {"type": "text", "text": " with "}, {"type": "image", "image": "img/b.png"},
                  {"type": "text", "text": "."}]),
            reply("Both red."), user("And this?"), reply("A silence."),
        ]},
        {"messages": [user([img]), reply("Red.")]},
        {"messages": [
            user("Weather in Paris?"),
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
            ]},
            {"role": "tool", "content": "sunny"}, reply("Sunny."),
        ], "tools": [{"name": "weather", "parameters": {}}]},
    ]  # fmt: skip
    assert [len(row.media) for row in read_rows(tmp_path / "out.jsonl")] == [3, 1, 0]


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-folder", "other-folder"])
def test_csv_layouts_to_ours_keep_media_reachable(tmp_path, elsewhere):
    src_dir = tmp_path / "data"
    cat, clip = png(src_dir / "pics" / "cat.png"), wav(src_dir / "clips" / "hello.wav")
    out_dir = tmp_path / "elsewhere" / "deep" if elsewhere else src_dir
    cases = {
        "text": (["prompt", "response", "system"], [["2 + 2?", "4", "Be exact."]]),
        "image": (["id", "image_path", "caption"], [["1", "pics/cat.png", "A red square."]]),
        "audio": (["audio_path", "text", "language"], [["clips/hello.wav", "hello", "en"]]),
    }
    for name, (header, values) in cases.items():
        src = write_csv(src_dir / f"{name}.csv", header, values)
        r = run("convert", src, out_dir / f"{name}.jsonl", "--from", "csv")
        assert r.exit_code == 0, r.output
        assert r.stdout.strip().endswith(f": 1 {name}")
    text, image, audio = (read_rows(out_dir / f"{name}.jsonl")[0] for name in cases)
    assert text.messages == ({"role": "system", "content": "Be exact."}, user("2 + 2?"), reply("4"))
    assert image.messages[0]["content"][1] == {"type": "text", "text": "Describe this image."}
    assert audio.messages[0]["content"][1]["text"] == "Please transcribe this audio."
    assert audio.messages[1] == reply("hello")
    assert Path(image.media[0][2]).resolve() == cat.resolve()
    assert Path(audio.media[0][2]).resolve() == clip.resolve()
    stored = lines(out_dir / "image.jsonl")[0]["messages"][0]["content"][0]["image"]
    assert stored == ("../../data/pics/cat.png" if elsewhere else "pics/cat.png")


def test_csv_prompt_option_and_question_layout(tmp_path):
    png(tmp_path / "cat.png")
    src = write_csv(tmp_path / "cap.csv", ["image_path", "caption"], [["cat.png", "A cat."]])
    r = run("convert", src, tmp_path / "cap.jsonl", "--from", "csv", "--prompt", "What is this?")
    assert r.exit_code == 0, r.output
    assert lines(tmp_path / "cap.jsonl")[0]["messages"][0]["content"][1]["text"] == "What is this?"
    vqa = write_csv(tmp_path / "vqa.csv", ["image_path", "question", "answer"],
                    [["cat.png", "Colour?", "Red."]])  # fmt: skip
    convert(vqa, tmp_path / "vqa.jsonl", from_format="csv")
    assert lines(tmp_path / "vqa.jsonl")[0]["messages"][0]["content"] == [
        {"type": "image", "image": "cat.png"},
        {"type": "text", "text": "Colour?"},
    ]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_round_trip(tmp_path, suffix):
    src = tmp_path / f"alpaca{suffix}"
    if suffix == ".json":
        src.write_text(json.dumps(ALPACA))
    else:
        jsonl(src, ALPACA)
    convert(src, tmp_path / "ours" / "rows.jsonl", from_format="alpaca")
    back = tmp_path / f"back{suffix}"
    convert(tmp_path / "ours" / "rows.jsonl", back, to_format="alpaca")
    assert (json.loads(back.read_text()) if suffix == ".json" else lines(back)) == ALPACA


def test_ours_to_alpaca_and_back_keeps_blank_lines(tmp_path):
    rows = [
        {"messages": [user("Step one.\n\nStep two."), reply("Done.")]},
        {"messages": [user("Ends in a blank line\n\n"), reply("Ok.")]},
        {"prompt": "A completion prompt", "completion": "and its end."},
    ]
    src = jsonl(tmp_path / "ours.jsonl", rows)
    convert(src, tmp_path / "alpaca.json", to_format="alpaca")
    convert(tmp_path / "alpaca.json", tmp_path / "again.jsonl", from_format="alpaca")
    again = lines(tmp_path / "again.jsonl")
    assert again[:2] == rows[:2]
    assert again[2] == {"messages": [user("A completion prompt"), reply("and its end.")]}


def test_sharegpt_round_trip(tmp_path):
    png(tmp_path / "media" / "a.png"), wav(tmp_path / "media" / "b.wav")
    rows = [
        {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]},
        {
            "conversations": [
                {"from": "system", "value": "Describe."},
                {"from": "human", "value": "<image>\nWhat is it? <audio>"},
                {"from": "gpt", "value": "A red square and a silence."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
            "images": ["media/a.png"],
            "audios": ["media/b.wav"],
        },
        {
            "conversations": [
                {"from": "human", "value": "Weather?"},
                {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                {"from": "observation", "value": "snow"},
                {"from": "gpt", "value": "Snow."},
            ],
            "tools": '[{"name": "weather"}]',
        },
    ]  # fmt: skip
    src = tmp_path / "share.json"
    src.write_text(json.dumps(rows))
    r = run("convert", src, tmp_path / "ours" / "rows.jsonl", "--from", "sharegpt")
    assert r.stdout.strip().endswith(": 1 audio+image, 2 text"), r.output
    convert(tmp_path / "ours" / "rows.jsonl", tmp_path / "back.json", to_format="sharegpt")
    assert json.loads((tmp_path / "back.json").read_text()) == rows


def test_csv_round_trips(tmp_path):
    pic, clip = png(tmp_path / "media" / "p.png"), wav(tmp_path / "media" / "c.wav")
    assert pic.is_file() and clip.is_file()
    cases = {
        "text": (["prompt", "response", "system"], [["Hi", "Hello", "Be kind."], ["Yo", "Hey", ""]]),
        "completion": (["text"], [["Once upon a time."], ["The end."]]),
        "image": (["image_path", "caption"], [["media/p.png", "Red."], ["media/p.png", "Square."]]),
        "vqa": (["image_path", "question", "answer"], [["media/p.png", "Colour?", "Red."]]),
        "audio": (["audio_path", "text"], [["media/c.wav", "silence"]]),
    }  # fmt: skip
    for name, (header, values) in cases.items():
        src = write_csv(tmp_path / f"{name}.csv", header, values)
        convert(src, tmp_path / "ours" / f"{name}.jsonl", from_format="csv")
        back = tmp_path / f"{name}.back.csv"  # beside src: media paths come back as written
        convert(tmp_path / "ours" / f"{name}.jsonl", back, to_format="csv")
        assert read_csv(back) == read_csv(src), name
    # --prompt must match on the way back too: rows said "Listen.", not the default instruction
    src = write_csv(tmp_path / "p.csv", ["audio_path", "text"], [["media/c.wav", "silence"]])
    convert(src, tmp_path / "p.jsonl", from_format="csv", prompt="Listen.")
    convert(tmp_path / "p.jsonl", tmp_path / "p2.csv", to_format="csv", prompt="Listen.")
    assert read_csv(tmp_path / "p2.csv") == read_csv(src)
    with pytest.raises(DataError, match=r"p\.jsonl:1: messages\[0\]\.content\[1\]\.text: csv"):
        convert(tmp_path / "p.jsonl", tmp_path / "p3.csv", to_format="csv")


@pytest.mark.parametrize(
    "fmt, row, message",
    [
        ("alpaca", {"messages": [user("a"), reply("b"), user("c"), reply("d")]},
         "messages: alpaca holds one user turn and one plain reply (after an optional system "
         "message), not user, assistant, user, assistant"),
        ("alpaca", {"messages": [user([{"type": "image", "image": "p.png"}]), reply("b")]},
         "messages[0].content[0]: alpaca holds no image here"),
        ("alpaca", {"text": "just text"}, "text: a plain text row has no prompt and reply for alpaca"),
        ("sharegpt", {"messages": [user("a"), reply([{"type": "image", "image": "p.png"}])]},
         "messages[1].content[0]: sharegpt holds image only in user turns"),
        ("csv", {"messages": [user([{"type": "text", "text": "q"}, {"type": "image", "image": "p.png"}]),
                              reply("b")]},
         "messages[0].content: csv holds one image or audio clip followed by text, not text + image"),
    ],
)  # fmt: skip
def test_rows_the_target_cannot_hold(tmp_path, fmt, row, message):
    png(tmp_path / "p.png")
    src = jsonl(tmp_path / "ours.jsonl", [{"messages": [user("ok"), reply("ok")]}, row])
    out = tmp_path / f"out.{fmt}"
    fails(run("convert", src, out, "--to", fmt), f"{src}:2: {message}")
    assert not out.exists()


def test_csv_needs_one_layout_per_file(tmp_path):
    src = jsonl(tmp_path / "ours.jsonl", [{"text": "plain"}, {"prompt": "p", "completion": "c"}])
    fails(run("convert", src, tmp_path / "out.csv", "--to", "csv"),
          f"{src}:2: a csv file holds one layout; this row fits text, the rows before it "
          "completion")  # fmt: skip


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fmt, name, text, message",
    [
        ("alpaca", "a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x",\n',
         "{src}:2: invalid JSON: Expecting property name enclosed in double quotes at column 21"),
        ("alpaca", "a.json", json.dumps([ALPACA[0]] * 3 + [{"instruction": "x", "output": ["5"]}]),
         "{src}:[3]: output: expected a string, got a list"),
        ("alpaca", "a.json", json.dumps([{"instruction": "x"}]), "{src}:[0]: output: missing"),
        ("alpaca", "a.jsonl", '{"instruction": "x", "output": "  "}\n', "{src}:1: output: empty"),
        ("sharegpt", "s.jsonl", '{"conversations": [{"from": "narrator", "value": "x"}]}\n',
         "{src}:1: conversations[0].from: 'narrator' is not one of system, developer, human, "
         "user, gpt, assistant, model, function_call, observation, tool, function"),
        ("sharegpt", "s.jsonl", '{"conversations": [{"from": "human", "value": "<image>"}, '
         '{"from": "gpt", "value": "x"}], "images": ["a.png", "a.png"]}\n',
         "{src}:1: images: 2 files but 1 <image> markers"),
        ("sharegpt", "s.jsonl", '{"conversations": [{"from": "human", "value": "<image>"}, '
         '{"from": "gpt", "value": "x"}], "images": ["gone.png"]}\n',
         "{src}:1: images[0]: file not found: gone.png"),
        ("csv", "d.csv", "prompt,answer\nq,a\n",
         "{src}:1: header prompt,answer: expected one of prompt,response | text | "
         "image_path,caption | image_path,question,answer | audio_path,text (plus optional "
         "system; id, language, duration ignored)"),
        ("csv", "d.csv", 'prompt,response\nq,a\n\n"multi\nline",b\nq,\n', "{src}:6: response: empty"),
        ("csv", "d.csv", "image_path,caption\na.png,A\n,B\n", "{src}:3: image_path: empty"),
        ("csv", "d.csv", "image_path,caption\na.png\n",
         "{src}:2: expected 2 fields (image_path,caption), got 1"),
        ("csv", "d.csv", "audio_path,text\nmissing.wav,hi\n",
         "{src}:2: audio_path: file not found: missing.wav"),
    ],
)  # fmt: skip
def test_broken_inputs_are_one_line(tmp_path, fmt, name, text, message):
    png(tmp_path / "a.png")
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / "out" / "rows.jsonl"
    fails(run("convert", src, out, "--from", fmt), message.format(src=src))
    assert not out.parent.exists()


def test_failed_convert_leaves_existing_output_whole(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "x", "output": ""}])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    fails(
        run("convert", src, out, "--from", "alpaca"), f"{out}: exists; pass --force to overwrite it"
    )
    fails(run("convert", src, out, "--from", "alpaca", "--force"), f"{src}:2: output: empty")
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out.jsonl"]  # no temp files
    fixed = jsonl(tmp_path / "a.jsonl", [ALPACA[0]])
    assert run("convert", fixed, out, "--from", "alpaca", "--force").exit_code == 0
    assert len(lines(out)) == 1


def test_convert_needs_one_direction(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [ALPACA[0]])
    message = "give one of --from FORMAT (to mlxtune JSONL) or --to FORMAT (from it)"
    fails(run("convert", src, tmp_path / "o.jsonl"), message)
    fails(run("convert", src, tmp_path / "o.jsonl", "--from", "alpaca", "--to", "csv"), message)
    fails(run("convert", src, tmp_path / "o.jsonl", "--from", "alpaca", "--prompt", "x"),
          "--prompt: a non-empty instruction, only for csv image and audio rows")  # fmt: skip


# --------------------------------------------------------------------------------- split


def numbered(tmp_path: Path, n: int, blank_every: int = 0) -> Path:
    path = tmp_path / "rows.jsonl"
    text = ""
    for i in range(n):
        text += json.dumps({"text": f"row {i}"}) + "\n"
        text += "\n" if blank_every and i % blank_every == 0 else ""
    path.write_text(text)
    return path


def test_split_counts_disjoint_complete(tmp_path):
    src = numbered(tmp_path, 40, blank_every=7)
    r = run("split", src, "--valid", "0.1", "--seed", "3")
    train, valid = tmp_path / "rows.train.jsonl", tmp_path / "rows.valid.jsonl"
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"wrote 36 rows to {train} and 4 to {valid} (seed 3)"
    train_lines, valid_lines = train.read_text().splitlines(), valid.read_text().splitlines()
    assert (len(train_lines), len(valid_lines)) == (36, 4)
    assert sorted(train_lines + valid_lines) == sorted(filter(None, src.read_text().splitlines()))
    assert not set(train_lines) & set(valid_lines)


def test_split_is_deterministic_by_seed(tmp_path):
    src = numbered(tmp_path, 30)
    valid = tmp_path / "rows.valid.jsonl"
    split(src, 5, seed=1)
    first = valid.read_text()
    split(src, 5, seed=1, force=True)
    assert valid.read_text() == first
    split(src, 5, seed=2, force=True)
    assert valid.read_text() != first
    assert len(valid.read_text().splitlines()) == 5


def test_split_keeps_one_row_each_side(tmp_path):
    split(numbered(tmp_path, 2), 0.01)
    assert len((tmp_path / "rows.valid.jsonl").read_text().splitlines()) == 1
    assert len((tmp_path / "rows.train.jsonl").read_text().splitlines()) == 1


def test_split_refuses_to_overwrite_unless_forced(tmp_path):
    src = numbered(tmp_path, 10)
    (tmp_path / "rows.valid.jsonl").write_text("keep\n")
    fails(
        run("split", src), f"{tmp_path / 'rows.valid.jsonl'}: exists; pass --force to overwrite it"
    )
    assert not (tmp_path / "rows.train.jsonl").exists()
    assert (tmp_path / "rows.valid.jsonl").read_text() == "keep\n"
    assert run("split", src, "--force").exit_code == 0
    assert (tmp_path / "rows.valid.jsonl").read_text() != "keep\n"


@pytest.mark.parametrize(
    "text, valid, message",
    [
        ('{"text": "a"}\n\n', "0.5", "{src}: 1 rows; a split needs at least 2"),
        ('{"text": "a"}\n{"text": "b"}\n{oops\n', "1",
         "{src}:3: invalid JSON: Expecting property name enclosed in double quotes at column 2"),
        ('{"text": "a"}\n{"text": "b"}\n', "2", "{src}: --valid 2 leaves no training rows (2 rows)"),
        ('{"text": "a"}\n{"text": "b"}\n', "1.5",
         "--valid 1.5: expected a share in (0, 1) or a row count >= 1"),
        ('{"text": "a"}\n{"text": "b"}\n', "0", "--valid 0: expected a share in (0, 1) or a row count >= 1"),
    ],
)  # fmt: skip
def test_split_errors(tmp_path, text, valid, message):
    src = tmp_path / "rows.jsonl"
    src.write_text(text)
    fails(run("split", src, "--valid", valid), message.format(src=src))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
