"""The framework-free data layer: row validation, loss masks through real chat templates,
packing and batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxtune.data.batching import (
    Batching,
    Position,
    Stream,
    collate,
    plan_epoch,
    prepare,
    shard,
)
from mlxtune.data.encode import encode
from mlxtune.data.rows import parse_row, read_rows
from mlxtune.errors import DataError
from mlxtune.tiny import make_tiny

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
        ]},
        {"role": "tool", "name": "weather", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}  # fmt: skip


@pytest.fixture(scope="module", params=["llama", "gemma4"])
def tok(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_tiny(tmp_path_factory.mktemp(request.param) / "m", request.param)
    return AutoTokenizer.from_pretrained(path)


def write_lines(tmp_path, lines: list[bytes | str]) -> str:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(x if isinstance(x, bytes) else x.encode() + b"\n" for x in lines))
    return str(path)


GOOD = json.dumps({"text": "fine"})


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [', "train.jsonl:2: invalid JSON: Expecting value at column 15"),
        (b"\xff\xfe{}\n", "train.jsonl:2: not UTF-8 (byte 0: 0xff)"),
        ("[1, 2]", "train.jsonl:2: expected a JSON object, got a list"),
        ('{"input": "x"}', "train.jsonl:2: no messages, prompt/completion or text field (found: input)"),
        ('{"messages": []}', "train.jsonl:2: messages: expected a non-empty list of messages"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}',
         "train.jsonl:2: messages[0].role: 'bot' is not one of system, developer, user, assistant, tool"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',
         "train.jsonl:2: messages[1].content: empty assistant turn"),
        ('{"messages": [{"role": "user", "content": 5}]}',
         "train.jsonl:2: messages[0].content: expected a string or a list of parts"),
        ('{"messages": [{"role": "user", "content": [{"type": "image", "image": 3}]}]}',
         "train.jsonl:2: messages[0].content[0].image: expected a string, got a int"),
        ('{"messages": [{"role": "user", "content": [{"type": "video"}]}]}',
         "train.jsonl:2: messages[0].content[0].type: expected one of text, image, audio"),
        ('{"prompt": "q", "completion": 7}', "train.jsonl:2: completion: expected a string, got a int"),
        ('{"text": ""}', "train.jsonl:2: text: expected a non-empty string"),
    ],
)  # fmt: skip
def test_bad_rows_are_one_line_with_file_line_and_field(tmp_path, bad, message):
    path = write_lines(tmp_path, [GOOD, bad])
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value) == f"{tmp_path}/{message}"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="train.jsonl: no rows"):
        read_rows(write_lines(tmp_path, ["", "  "]))


def test_media_parts_are_read_but_need_a_multimodal_model(tok):
    row = parse_row(
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                  {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": "red"}]},
        "d.jsonl:4",
    )  # fmt: skip
    assert row.media == [("messages[0].content[0].image", "image", "cat.png")]
    with pytest.raises(
        DataError, match=r"^d.jsonl:4: messages\[0\].content\[0\].image: image parts"
    ):
        encode(row, tok)


def _loss_text(tok, ex) -> str:
    return "".join(tok.decode([int(i)]) for i in ex.ids[ex.loss])


def test_loss_on_every_assistant_turn(tok):
    ex = encode(parse_row(CHAT, "c:1"), tok)
    text = _loss_text(tok, ex)
    for piece in ("weather", "Paris", "It is sunny.", "You are welcome."):
        assert piece in text
    for piece in ("Be brief", "Weather in", "sunny<", "Thanks"):
        assert piece not in text
    # each turn's end marker is learned; the tool's reply is not
    end = "<|eot_id|>" if "<|eot_id|>" in tok.get_vocab() else "<turn|>"
    assert text.count(end) >= 2 and "response:weather" not in text


def test_loss_on_last_turn_and_on_all(tok):
    row = parse_row(CHAT, "c:1")
    last = _loss_text(tok, encode(row, tok, loss_on="last_assistant"))
    assert "You are welcome." in last and "It is sunny" not in last
    everything = encode(row, tok, loss_on="all")
    assert everything.loss.all()


def test_gemma4_thought_block_in_generation_prompt():
    """26B/31B templates put an empty thought block after the generation prompt; the finished
    turn does not have it. Spans come from the common prefix, so the answer is still found."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = AutoTokenizer.from_pretrained(make_tiny(f"{d}/g", "gemma4"))
    plain = encode(parse_row(CHAT, "c:1"), tok)
    tok.chat_template = tok.chat_template.replace(
        "{{- '<|turn>model\\n' -}}", "{{- '<|turn>model\\n<|channel>thought\\n<channel|>' -}}"
    )
    assert "<|channel>" in tok.apply_chat_template(CHAT["messages"][:2], tokenize=False,
                                                   add_generation_prompt=True)  # fmt: skip
    quirky = encode(parse_row(CHAT, "c:1"), tok)
    assert np.array_equal(plain.ids, quirky.ids) and np.array_equal(plain.loss, quirky.loss)


def test_gemma4_tool_call_ends_with_its_stop_token(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny(tmp_path / "g", "gemma4"))
    stop = tok.convert_tokens_to_ids("<|tool_response>")
    row = parse_row(CHAT, "c:1")
    with_stop, without = encode(row, tok, stop_ids=frozenset({stop})), encode(row, tok)
    assert stop in with_stop.ids[with_stop.loss].tolist()
    assert stop not in without.ids[without.loss].tolist()


def test_text_and_completion_rows(tok):
    text = encode(parse_row({"text": "The quick brown fox."}, "t:1"), tok)
    assert text.ids[0] == tok.bos_token_id and text.ids[-1] == tok.eos_token_id and text.loss.all()
    row = parse_row({"prompt": "Colour of the sky?", "completion": "blue"}, "t:2")
    ex = encode(row, tok)
    assert _loss_text(tok, ex).startswith("blue") and "sky" not in _loss_text(tok, ex)


def _dataset(tok, n=200, seed=0):
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "weather",
        "today",
        "sunny",
    ]
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.integers(3, 60)))
        a = " ".join(rng.choice(words, rng.integers(1, 40)))
        rows.append(parse_row({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}, f"r:{i}"))  # fmt: skip
    return prepare(rows, tok, max_seq_len=256)


def test_packing_fills_rows_and_keeps_every_example(tok):
    data = _dataset(tok)
    plan = plan_epoch(data.lengths, Batching(256, True, rows=4), seed=0, epoch=0)
    rows = [row for batch in plan for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(len(data.examples)))
    used = [sum(int(data.lengths[i]) for i in row) for row in rows]
    assert max(used) <= 256
    fill = sum(used) / (len(rows) * 256)
    assert fill >= 0.95, fill
    unpacked = plan_epoch(data.lengths, Batching(256, False, rows=4), seed=0, epoch=0)
    assert sum(len(b) for b in unpacked) == len(data.examples)


@pytest.mark.parametrize("packing", [False, True])
def test_a_token_budget_bounds_every_micro_batch_whatever_the_lengths(packing):
    """train.batch_tokens: no micro-batch holds more slots (rows x padded length) than the
    budget, except a lone row longer than it; short rows come many to a batch, long ones few;
    every example is used exactly once per epoch; the planner's bound is the real maximum."""
    rng = np.random.default_rng(0)
    for case in range(30):
        n = int(rng.integers(1, 400))
        top = int(rng.choice([40, 300, 1024]))
        lengths = rng.integers(1, top + 1, n)
        b = Batching(1024, packing, rows=int(rng.choice([0, 3, 64])) or None,
                     tokens=int(rng.choice([512, 2048, 4096])))  # fmt: skip
        plan = plan_epoch(lengths, b, seed=case, epoch=0)
        seen = sorted(i for batch in plan for row in batch for i in row)
        assert seen == list(range(n)), case
        most = 0
        for batch in plan:
            used = [sum(int(lengths[i]) for i in row) for row in batch]
            slots = len(batch) * b.padded(max(used))
            assert slots <= b.tokens or len(batch) == 1, (case, used)
            assert b.rows is None or len(batch) <= b.rows
            most = max(most, slots)
        assert most <= b.most_tokens()
    # Few long rows or many short ones, never a fixed count of rows.
    short = plan_epoch(np.full(100, 30), Batching(1024, False, tokens=2048), 0, 0)
    long = plan_epoch(np.full(8, 1000), Batching(1024, False, tokens=2048), 0, 0)
    assert {len(x) for x in short} == {64, 36} and {len(x) for x in long} == {2}


def test_ranks_split_each_micro_batch_so_every_example_runs_exactly_once(tok):
    """Data parallel: across ranks, every example runs exactly once per epoch (ids recorded from
    the shares the trainers run), the shares hold exactly the global batch's tokens (the counts
    every rank uses to normalise the step), their row counts differ by at most one, and the
    global plan is the plan of one process with the ranks' summed budget."""
    data = _dataset(tok, n=90)
    for size, packing in ((2, False), (3, True), (4, False)):
        per_rank = Batching(256, packing, tokens=256, ranks=size)
        b = Batching(256, packing, tokens=256 * size, ranks=size)
        assert b.key() == Batching(256, packing, tokens=256 * size).key() != per_rank.key()
        stream = Stream(data, b, seed=1)
        for epoch in range(2):
            seen = []
            for index in range(len(stream.plan(epoch))):
                at = Position(epoch, index)
                shares = [stream.share(at, rank, size)[0] for rank in range(size)]
                batches = [s.batch for s in shares if s.batch is not None]
                assert {(s.loss_tokens, s.real_tokens, s.slots) for s in shares} == {(
                    sum(x.loss_tokens for x in batches), sum(x.real_tokens for x in batches),
                    sum(x.inputs.size for x in batches))}  # fmt: skip
                counts = [len(s.rows) for s in shares]
                assert max(counts) - min(counts) <= 1
                seen += [i for s in shares for row in s.rows for i in row]
            assert sorted(seen) == list(range(len(data.examples))), (size, epoch)
    rng = np.random.default_rng(1)  # and on random lengths, the split alone
    for case in range(20):
        lengths = rng.integers(1, 1025, int(rng.integers(1, 300)))
        b = Batching(1024, bool(case % 2), tokens=int(rng.choice([1024, 4096, 16384])))
        size = int(rng.choice([2, 3, 4, 8]))
        for batch in plan_epoch(lengths, b, seed=case, epoch=0):
            parts = [shard(batch, lengths, k, size) for k in range(size)]
            assert sorted(map(sorted, sum(parts, []))) == sorted(map(sorted, batch)), case
            tokens = [sum(int(lengths[i]) for row in part for i in row) for part in parts]
            longest = max(sum(int(lengths[i]) for i in row) for row in batch)
            assert max(tokens) - min(tokens) <= longest, case


def test_plans_are_deterministic_per_seed_and_epoch(tok):
    data = _dataset(tok)
    a = plan_epoch(data.lengths, Batching(256, True, rows=4), seed=3, epoch=1)
    assert a == plan_epoch(data.lengths, Batching(256, True, rows=4), seed=3, epoch=1)
    assert a != plan_epoch(data.lengths, Batching(256, True, rows=4), seed=3, epoch=2)


def test_collate_lays_examples_out_with_segments(tok):
    data = _dataset(tok, n=6)
    batch = collate(data.examples, [[0, 1], [2]], 256)
    n0, n1, n2 = (len(data.examples[i]) - 1 for i in range(3))
    assert batch.inputs.shape[1] % 32 == 0 and batch.inputs.shape[1] >= n0 + n1
    assert (batch.segments[0, :n0] == 1).all() and (batch.segments[0, n0 : n0 + n1] == 2).all()
    assert (batch.segments[0, n0 + n1 :] == 0).all() and (batch.segments[1, n2:] == 0).all()
    assert np.array_equal(batch.targets[0, :n0], data.examples[0].ids[1:])
    assert batch.loss_tokens == sum(int(data.examples[i].loss[1:].sum()) for i in range(3))
    assert not batch.weights[batch.segments == 0].any()


def test_stream_resumes_at_a_position(tok):
    data = _dataset(tok, n=40)
    stream = Stream(data, Batching(256, True, rows=4), seed=0)
    pos, seen = Position(), []
    for _ in range(7):
        batch, pos = stream.take(pos)
        seen.append(batch.inputs)
    again = Stream(data, Batching(256, True, rows=4), seed=0)
    batch, _ = again.take(Position(pos.epoch, pos.index))
    nxt, _ = stream.take(pos)
    assert np.array_equal(batch.inputs, nxt.inputs)
    assert pos.epoch >= 1  # 40 short examples pack into few batches: it wrapped an epoch


def test_overlong_rows_are_truncated_or_skipped_and_counted(tok):
    long = parse_row({"messages": [{"role": "user", "content": "fox " * 20},
                                    {"role": "assistant", "content": "dog " * 200}]}, "l:1")  # fmt: skip
    short = parse_row({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}]}, "l:2")  # fmt: skip
    cut = prepare([long, short], tok, max_seq_len=64)
    assert cut.stats.truncated == 1 and max(len(e) for e in cut.examples) == 64
    skip = prepare([long, short], tok, max_seq_len=64, overlong="skip")
    assert skip.stats.skipped == 1 and len(skip.examples) == 1
    assert "1 truncated, 0 skipped" in cut.stats.line("train", 64)
    with pytest.raises(DataError, match="no row has a target token within max_seq_len 8"):
        prepare([long], tok, max_seq_len=8, overlong="skip")
