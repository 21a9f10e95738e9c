"""GRPO (`train.method: grpo`): TRL's loss and gradients on the same sampled group, rewards
and advantages as TRL computes them, a learn test, exact resume, and one-line errors for
reward files that do not import, functions that raise or return the wrong length."""

from __future__ import annotations

import json
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxtune as mt
from mlxtune import demo, grpo, rewards, trainer
from mlxtune.config import load_config
from mlxtune.errors import ConfigError
from mlxtune.grporun import GrpoRun, answers_of

REWARDS = '''
def right_group(prompts, completions, group, **kw):
    """1 when the answer starts with the prompt's group."""
    return [1.0 if c.strip().startswith(g) else 0.0 for c, g in zip(completions, group)]
'''


def group_rows(seed: int, n: int) -> list[dict]:
    """Prompts of the demo's group task, the right group as a column for the reward."""
    return [{"prompt": r["messages"][0]["content"], "group": r["messages"][1]["content"]}
            for r in demo.rows(seed, n)]  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "rewards.py").write_text(REWARDS)
    for name, seed, n in (("train", 0, 200), ("valid", 1000, 24)):
        rows = group_rows(seed, n)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _group(run_dir, task, overrides, backend="mlx"):
    """One prompt's four sampled answers with fixed advantages and reference log-probs: our
    loss and LoRA gradients (MLX, or the twin's), and what TRL needs for the same batch."""
    cfg = load_config(run_dir / "config.yaml", [
        "train.method=grpo", f"train.reward_functions={task / 'rewards.py'}",
        f"data.train={task / 'train.jsonl'}", "data.valid=", "train.group_size=4",
        "train.max_completion_tokens=6", "train.temperature=0.7", "train.ce_chunk_tokens=16",
        *overrides])  # fmt: skip
    engine = trainer.setup(cfg, adapter=run_dir)
    run = GrpoRun(engine, run_dir.parent / "unused", True, lambda line: None)
    prompt = run.train.encoded[0]
    sampled = grpo.sample(engine, prompt, 4, 6, 1.0, 3, run.stops)
    answers = answers_of([prompt], [sampled], run.stops, run.tokenizer, 6)
    rng = np.random.default_rng(0)
    answers.advantages = rng.normal(0, 1, 4).astype(np.float32)
    counts = answers.counts
    ((batch, owner, counts, n, tokens),) = run.micro_batches(answers, [4])
    host = run.arrays(batch, owner, counts, n, tokens, partial(trainer.gather_positions,
                                                               multiple=64), answers)  # fmt: skip
    real = int(counts.sum())
    reference = np.zeros(len(host[2]), np.float32)
    reference[:real] = rng.normal(-4, 1, real)
    if backend == "cuda":
        from test_preference import replace_backend

        from cuda_backend import grpo as twin
        from cuda_backend import trainer as twin_trainer

        engine = twin_trainer.setup(replace_backend(cfg), adapter=run_dir)
        for name, param in engine.model.named_parameters():
            param.requires_grad_(".lora_" in name)
        loss, _ = twin.micro_loss(engine, batch, host, reference)
        loss.backward()
        grads = {k: p.grad.numpy() for k, p in engine.model.named_parameters()
                 if p.grad is not None}  # fmt: skip
    else:
        model = engine.model
        model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
        fn = partial(grpo.grpo_loss, model, engine.split, cfg.train, masked=engine.masked)
        (loss, _), g = nn.value_and_grad(model, fn)(*map(mx.array, host), mx.array(reference),
                                                    {})  # fmt: skip
        grads = dict(tree_flatten(g))
    return engine, loss.item(), grads, prompt, answers, reference[:real]


def _trl_loss(model, tokenizer, task, prompt, answers, reference, tmp_path, **config):
    """TRL's GRPOTrainer._compute_loss on the same prompt, answers, advantages and reference."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def never(prompts, completions, **kw):  # the batch is given; TRL never samples here
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                      num_generations=4,
                      per_device_train_batch_size=4, max_completion_length=6, temperature=0.7,
                      **config)  # fmt: skip
    trl = GRPOTrainer(model=model, reward_funcs=[never], args=args, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(group_rows(0, 4)))  # fmt: skip
    trl.current_gradient_accumulation_steps = 1
    completions = [e.ids[len(prompt) :] for e in answers.examples]
    width = max(map(len, completions))
    ids = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ref = torch.zeros((4, width))
    at = 0
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c.astype(np.int64))
        mask[i, : len(c)] = 1
        ref[i, : len(c)] = torch.tensor(reference[at : at + len(c)])
        at += len(c)
    prompt_ids = torch.tensor(prompt.ids.astype(np.int64)).repeat(4, 1)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
              "completion_ids": ids, "completion_mask": mask,
              "advantages": torch.tensor(answers.advantages), "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}  # fmt: skip
    trl.model.train()
    return trl._compute_loss(trl.model, inputs)


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_gradients_equal_trls(trained, tiny, task, tmp_path, loss_type, backend):
    """One prompt's four answers (sampled here), fixed advantages and reference log-probs, KL
    weight 0.04, temperature 0.7: the loss and LoRA gradients are TRL's GRPOTrainer's on
    transformers + PEFT (fp32), on MLX and on the twin."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("trl")

    run_dir = trained("llama")
    overrides = [f"train.grpo_loss={loss_type}", "train.beta=0.04"]
    engine, loss, grads, prompt, answers, reference = _group(run_dir, task, overrides, backend)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama"), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, run_dir, is_trainable=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny("llama"))
    theirs = _trl_loss(model, tokenizer, task, prompt, answers, reference, tmp_path,
                       loss_type=loss_type, beta=0.04)  # fmt: skip
    np.testing.assert_allclose(loss, theirs.item(), rtol=1e-4, atol=1e-7)
    theirs.backward()
    to_ours = {hf: path for path, hf in engine.hf_names.items()}
    compared = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        module, rest = name.removeprefix("base_model.model.").split(".lora_", 1)
        want = p.grad.numpy().T
        if backend == "cuda":
            got = grads[f"{to_ours[module]}.lora_{rest[0]}"].T
        else:
            got = np.array(grads[f"{to_ours[module]}.lora_{rest[0].lower()}"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        compared += 1
    assert compared == 2 * len(engine.adapted)


def test_rewards_and_advantages_are_trls():
    """Weighted sums skipping abstentions, group baselines, unbiased group / batch std + 1e-4,
    advantage 0 for an answer no function scored (TRL's sum_then_normalize)."""
    per = np.array([[1.0, np.nan], [0.0, 2.0], [np.nan, np.nan], [1.0, 1.0]])
    weights = np.array([1.0, 0.5])
    adv, total = rewards.advantages(per, weights, 2, "group")
    np.testing.assert_allclose(total[[0, 1, 3]], [1.0, 1.0, 1.5])
    assert np.isnan(total[2]) and adv[2] == 0.0 and adv[3] == 0.0  # a group of one scored
    np.testing.assert_allclose(adv[:2], [0.0, 0.0])
    adv, _ = rewards.advantages(np.array([[0.0], [1.0], [1.0], [1.0]]), np.ones(1), 2, "batch")
    std = np.std([0.0, 1.0, 1.0, 1.0], ddof=1)
    np.testing.assert_allclose(adv, [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0], rtol=1e-6)


SHAPED = '''
GROUPS = ("fruit", "animal", "tool", "colour")


def names_a_group(prompts, completions, **kw):
    """Half a point for answering with any group's name."""
    return [0.5 if c.split()[:1] and c.split()[0] in GROUPS else 0.0 for c in completions]


def right_group(prompts, completions, group, **kw):
    """A point for the prompt's own group."""
    return [1.0 if c.strip().startswith(g) else 0.0 for c, g in zip(completions, group)]
'''


def test_grpo_raises_the_held_out_reward(tiny, task, tmp_path):
    """A tiny random Llama almost never answers "Group: cat dog" with a group's name; GRPO
    with a reward that gives half a point for any group and a point for the right one raises
    the greedy reward on held-out prompts far above where it started (step 0's validation)."""
    (tmp_path / "shaped.py").write_text(SHAPED)
    run = mt.train(model=str(tiny("llama")),
                   data={"train": str(task / "train.jsonl"), "valid": str(task / "valid.jsonl"),
                         "max_seq_len": 64},
                   train={"method": "grpo", "iters": 40, "batch_size": 4, "group_size": 8,
                          "max_completion_tokens": 3, "learning_rate": 1e-2, "report_every": 10,
                          "eval_every": 20, "save_every": 0,
                          "reward_functions": str(tmp_path / "shaped.py")},
                   lora={"rank": 8}, output={"dir": str(tmp_path / "run")}, echo=None)  # fmt: skip
    valid = [r for r in run.metrics if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [0, 20, 40]
    assert valid[0]["reward"] <= 0.1 and valid[-1]["reward"] >= valid[0]["reward"] + 0.4, valid
    assert valid[-1]["rewards"]["names_a_group"] >= 0.4
    trains = [r for r in run.metrics if r["kind"] == "train"]
    assert set(trains[-1]["rewards"]) == {"names_a_group", "right_group"}
    assert trains[-1]["reward"] > trains[0]["reward"] and "sampled_tokens_per_s" in trains[-1]


BAD = {
    "does not import": ("import json\n\ndef score(prompts, completions, **kw):\n"
                        "    return [len(c) for c in completions\n",
                        "rewards.py:4: does not import: SyntaxError"),
    "raises": ("def score(prompts, completions, **kw):\n    return [1 / 0 for c in completions]\n",
               "train.reward_functions: score (rewards.py:2): raised ZeroDivisionError"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_reward_file_is_one_line_and_leaves_no_run_folder(tiny, task, tmp_path, case):
    from _cli import mlxtune

    source, message = BAD[case]
    (tmp_path / "rewards.py").write_text(source)
    out = tmp_path / "run"
    config = tmp_path / "grpo.yaml"
    config.write_text(f"""model: {{path: {tiny("llama")}}}
data: {{train: {task / "train.jsonl"}, max_seq_len: 64}}
train: {{method: grpo, iters: 2, group_size: 4, batch_size: 2, max_completion_tokens: 2,
        reward_functions: {tmp_path / "rewards.py"}}}
output: {{dir: {out}}}
""")
    done = mlxtune("train", config)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.parametrize("returned, message", [
    ("[1.0]", "train.reward_functions: score: returned 1 values for 4 completions"),
    ("['1'] * len(completions)", "train.reward_functions: score: value 0 is str, not a number"),
    ("None", "train.reward_functions: score: returned NoneType, not a list of 4 values"),
])  # fmt: skip
def test_a_reward_function_returning_the_wrong_thing_is_one_line(tmp_path, returned, message):
    (tmp_path / "rewards.py").write_text(
        f"def score(prompts, completions, **kw):\n    return {returned}\n"
    )
    funcs = rewards.load_rewards(str(tmp_path / "rewards.py"))
    with pytest.raises(rewards.RewardError) as e:
        rewards.score(funcs, ["p"] * 4, ["c"] * 4, [[1]] * 4, {})
    assert str(e.value) == message


def test_grpo_needs_reward_functions_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.method=grpo"])
    assert "train.reward_functions: train.method grpo needs a file of reward functions" in str(
        e.value)  # fmt: skip


def test_a_stopped_grpo_run_resumes_to_the_straight_runs_rewards_and_adapter(tiny, task,
                                                                             tmp_path):  # fmt: skip
    """Stopped after step 6 (checkpoint at 4), with accumulation and a KL weight: the resumed
    run samples what the straight run sampled (keys from seed, step and prompt), so its
    rewards, KL and final adapter are the straight run's."""
    from conftest import straight_and_resumed

    (tmp_path / "shaped.py").write_text(SHAPED)

    def config(out):
        return load_config(None, [
            f"model.path={tiny('llama')}", f"output.dir={out}", f"data.train={task / 'train.jsonl'}",
            "data.max_seq_len=64", "train.method=grpo", "train.iters=8", "train.save_every=4",
            "train.grad_accum=2", "train.batch_size=2", "train.group_size=4",
            "train.max_completion_tokens=3", "train.report_every=3", "train.beta=0.04",
            "train.learning_rate=1e-2", f"train.reward_functions={tmp_path / 'shaped.py'}"])  # fmt: skip

    straight, resumed, _, want, got = straight_and_resumed(config, tmp_path,
                                                          ("reward", "kl", "loss"))  # fmt: skip
    assert [s for s, *_ in got] == [3, 6, 8]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-7)
    a = mx.load(str(straight / "adapter_model.safetensors"))
    b = mx.load(str(resumed / "adapter_model.safetensors"))
    assert all(mx.allclose(a[k], b[k], rtol=1e-5, atol=1e-7).item() for k in a)


PITCH = '''
def names_the_pitch(prompts, completions, pitch, **kw):
    """A point for the tone's pitch, a tenth for naming another."""
    said = [(c[0]["content"].split() or [""])[0].strip(",.") for c in completions]
    return [1.0 if s == p else 0.1 if s in ("high", "mid", "low") else 0.0
            for s, p in zip(said, pitch)]
'''


@pytest.mark.slow
def test_grpo_on_audio_prompts_raises_the_reward_for_naming_the_pitch(tmp_path):
    """The tones task on a tiny Gemma 4: a short SFT run teaches the answer's form (greedy, it
    then says "mid" to every clip), GRPO trains on from its adapter with audio prompts
    (`model.adapter`) and the reward "names the pitch": clips embedded in the sampled groups
    and in the policy's forward pass, the sampled answers' reward rises."""
    from mlxtune.tiny import make_tiny

    model = make_tiny(tmp_path / "gemma4", "gemma4")
    demo.write_media_task(tmp_path / "data", n_train=240, n_valid=90)

    def audio_only(name):
        rows = [
            json.loads(x) for x in (tmp_path / "data" / f"{name}.jsonl").read_text().splitlines()
        ]
        return [
            r for r in rows if [p["type"] for p in r["messages"][0]["content"]] == ["audio", "text"]
        ]

    train, valid = audio_only("train"), audio_only("valid")
    for name, rows in (("sft", train), ("gtrain", train), ("gvalid", valid)):
        if name != "sft":
            rows = [
                {"prompt": r["messages"][:1], "pitch": r["messages"][1]["content"]} for r in rows
            ]
        (tmp_path / "data" / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    (tmp_path / "rewards.py").write_text(PITCH)
    sft = mt.train(model=str(model), data={"train": str(tmp_path / "data" / "sft.jsonl"),
                                           "max_seq_len": 256},
                   train={"iters": 25, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 5,
                          "eval_every": 0, "save_every": 0},
                   output={"dir": str(tmp_path / "sft")}, echo=None)  # fmt: skip
    run = mt.train(model={"path": str(model), "adapter": str(sft.dir)},
                   data={"train": str(tmp_path / "data" / "gtrain.jsonl"),
                         "valid": str(tmp_path / "data" / "gvalid.jsonl"), "max_seq_len": 256},
                   train={"method": "grpo", "iters": 40, "batch_size": 4, "group_size": 8,
                          "max_completion_tokens": 4, "temperature": 0.7, "learning_rate": 3e-3,
                          "report_every": 5, "eval_every": 40, "save_every": 0,
                          "reward_functions": str(tmp_path / "rewards.py")},
                   output={"dir": str(tmp_path / "grpo")}, echo=None)  # fmt: skip
    rewards = [r["reward"] for r in run.metrics if r["kind"] == "train"]
    assert np.mean(rewards[-2:]) >= np.mean(rewards[:2]) + 0.1, rewards
    valid_rows = [r for r in run.metrics if r["kind"] == "valid"]
    assert [r["step"] for r in valid_rows] == [0, 40] and valid_rows[0]["prompts"] == len(valid)


def test_a_judge_model_scores_every_answer_through_the_fusion_client(tiny, task, tmp_path):
    """`train.reward_judge`: a loopback OpenAI-compatible judge is asked once per sampled
    answer (the instructions, then the prompt and the answer); its number / 10 is the reward
    `judge`, logged beside the file's functions. A judge whose every call fails stops the run
    in one line, before any run folder exists."""
    from _cli import mlxtune
    from _providers import Providers, Reply

    (tmp_path / "shaped.py").write_text(SHAPED)

    def judge(body):
        answer = body["messages"][-1]["content"].split("Answer:\n", 1)[1]
        return Reply("Score: 7" if answer.strip() else "none")

    with Providers().thread() as p:
        url = p.add("judge", judge)
        run = mt.train(model=str(tiny("llama")),
                       data={"train": str(task / "train.jsonl"), "max_seq_len": 64},
                       train={"method": "grpo", "iters": 2, "batch_size": 2, "group_size": 4,
                              "max_completion_tokens": 3, "report_every": 1, "eval_every": 0,
                              "save_every": 0, "reward_functions": str(tmp_path / "shaped.py"),
                              "reward_judge": {"base_url": url, "model": "judge-model"}},
                       output={"dir": str(tmp_path / "run")}, echo=None)  # fmt: skip
        asked = [r["body"] for r in p.requests["judge"]]
        failing = p.add("down", Reply(status=500, error_body="down"))
        config = tmp_path / "judge.yaml"
        config.write_text(f"""model: {{path: {tiny("llama")}}}
data: {{train: {task / "train.jsonl"}, max_seq_len: 64}}
train: {{method: grpo, iters: 1, group_size: 2, batch_size: 1, max_completion_tokens: 2,
        reward_judge: {{base_url: '{failing}', model: m, max_retries: 0}}}}
output: {{dir: {tmp_path / "down"}}}
""")
        done = mlxtune("train", config)
    assert len(asked) == 2 * 2 * 4
    first = asked[0]["messages"]
    assert first[0]["role"] == "system" and "from 0 (not at all) to 10" in first[0]["content"]
    assert first[1]["content"].startswith("Prompt:\nGroup: ")
    rows = [r for r in run.metrics if r["kind"] == "train"]
    assert set(rows[0]["rewards"]) == {"names_a_group", "right_group", "judge"}
    said = [m["messages"][1]["content"].split("Answer:\n", 1)[1].strip() for m in asked]
    want = [0.7 if s else None for s in said]
    got = [r["rewards"]["judge"] for r in rows]
    for step, share in zip(got, (want[:8], want[8:]), strict=True):
        scored = [w for w in share if w is not None]
        assert step == pytest.approx(sum(scored) / len(scored), abs=1e-4)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "train.reward_judge: every call failed" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "down").exists()


def test_packing_a_group_changes_no_loss_or_gradient(trained, task):
    """`data.packing`: a micro-batch's answers packed several to a row (the group's forward
    pass at once) give the loss and LoRA gradients of one answer per row."""
    run_dir = trained("llama")
    cfg = load_config(run_dir / "config.yaml", [
        "train.method=grpo", f"train.reward_functions={task / 'rewards.py'}",
        f"data.train={task / 'train.jsonl'}", "data.valid=", "train.group_size=4",
        "train.max_completion_tokens=6", "train.beta=0.04", "data.max_seq_len=64"])  # fmt: skip
    engine = trainer.setup(cfg, adapter=run_dir)
    model = engine.model
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    run = GrpoRun(engine, run_dir.parent / "unused", True, lambda line: None)
    prompts = [run.train.encoded[i] for i in (0, 1)]
    sampled = [grpo.sample(engine, p, 4, 6, 1.0, 5 + i, run.stops) for i, p in enumerate(prompts)]
    answers = answers_of(prompts, sampled, run.stops, run.tokenizer, 6)
    answers.advantages = np.random.default_rng(1).normal(0, 1, 8).astype(np.float32)
    fn = partial(grpo.grpo_loss, model, engine.split, cfg.train, masked=True)
    results = []
    for packing in (False, True):
        run.packing = packing
        ((batch, owner, counts, n, tokens),) = run.micro_batches(answers, [8])
        host = run.arrays(batch, owner, counts, n, tokens,
                          partial(trainer.gather_positions, multiple=64), answers)  # fmt: skip
        reference = np.full(len(host[2]), -3.0, np.float32)
        (loss, _), g = nn.value_and_grad(model, fn)(*map(mx.array, host), mx.array(reference),
                                                    {})  # fmt: skip
        results.append((batch.inputs.shape[0], loss.item(), dict(tree_flatten(g))))
    (rows_a, loss_a, grads_a), (rows_b, loss_b, grads_b) = results
    assert rows_a == 8 and rows_b < rows_a  # packed: fewer rows
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for k in grads_a:
        np.testing.assert_allclose(np.array(grads_b[k]), np.array(grads_a[k]), rtol=1e-4,
                                   atol=1e-6 * np.abs(np.array(grads_a[k])).max())  # fmt: skip
