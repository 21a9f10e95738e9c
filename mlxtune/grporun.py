"""What the MLX and PyTorch GRPO trainers share: the prompts, the plan, the sampled answers
as training examples, their rewards and advantages, and the reports. Framework-free.

A step takes `train.grad_accum` micro-batches of `train.batch_size` prompts (1 when unset),
samples `train.group_size` answers to each with the policy as it is, scores every answer with
the reward functions, and turns rewards into advantages within each group (TRL's GRPO with one
pass per sampling, so the sampling policy is the one being trained). The answers of a
micro-batch are then run through the policy, one per row, or packed several to a row with
`data.packing`: the forward pass of a whole group at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.batching import Batching, _first_fit, collate, plan_epoch
from .data.encode import Encoded, encode_prompt
from .data.pairs import ROW_MULTIPLE
from .data.prompts import PromptRow, read_prompts
from .errors import ConfigError, DataError
from .io import atomic_folder
from .pairloss import token_weights
from .pairrun import MethodRun
from .rewards import Judge, Reward, advantages, load_rewards, score
from .runs import total_steps


@dataclass(frozen=True)
class Prompts:
    rows: list[PromptRow]
    encoded: list[Encoded]
    skipped: int = 0

    def line(self, name: str, max_seq_len: int, room: int) -> str:
        over = f"; {self.skipped} skipped (over max_seq_len {max_seq_len} - {room})"
        return f"{name}: {len(self.rows)} prompts" + (over if self.skipped else "")


def load_prompts(engine, path: str) -> Prompts:
    """The prompt rows of a JSONL file, encoded for `engine`'s model; a prompt that leaves no
    room for train.max_completion_tokens within data.max_seq_len is skipped and counted."""
    cfg = engine.cfg
    room = cfg.data.max_seq_len - cfg.train.max_completion_tokens
    rows, encoded, skipped = [], [], 0
    for row in read_prompts(path):
        enc = encode_prompt(row.row, engine.loaded.tokenizer, engine.media)
        if len(enc) > room:
            skipped += 1
            continue
        rows.append(row)
        encoded.append(enc)
    if not rows:
        raise DataError(f"{path}: no prompt leaves room for train.max_completion_tokens "
                        f"{cfg.train.max_completion_tokens} within data.max_seq_len "
                        f"{cfg.data.max_seq_len}")  # fmt: skip
    return Prompts(rows, encoded, skipped)


@dataclass
class Answers:
    """The sampled answers of a step, as training examples, with their scores."""

    examples: list[Encoded]  # prompt + answer; loss on the answer (its stop token included)
    group: list[int]  # each answer's prompt, as an index into the step's prompts
    texts: list[str]
    truncated: np.ndarray  # bool: stopped by max_completion_tokens
    per_func: np.ndarray | None = None  # [answers, functions]
    rewards: np.ndarray | None = None
    advantages: np.ndarray | None = None

    @property
    def counts(self) -> np.ndarray:
        return np.array([int(e.loss.sum()) for e in self.examples])


def answers_of(prompts: list[Encoded], sampled: list[list[np.ndarray]], stops, tokenizer,
               max_tokens: int) -> Answers:  # fmt: skip
    """Training examples of each prompt's sampled token lists (each cut after its first stop
    token, which carries loss as the end of the answer)."""
    examples, group, texts, truncated = [], [], [], []
    for p, (prompt, outs) in enumerate(zip(prompts, sampled, strict=True)):
        for ids in outs:
            ids = np.asarray(ids, np.int32)
            ends = np.flatnonzero(np.isin(ids, list(stops)))
            cut = ids[: ends[0] + 1] if len(ends) else ids[:max_tokens]
            body = cut[:-1] if len(ends) else cut
            examples.append(Encoded(np.concatenate([prompt.ids, cut]),
                                    np.concatenate([np.zeros(len(prompt), bool),
                                                    np.ones(len(cut), bool)]),
                                    prompt.where, prompt.media))  # fmt: skip
            group.append(p)
            texts.append(tokenizer.decode(body.tolist(), skip_special_tokens=True))
            truncated.append(not len(ends))
    return Answers(examples, group, texts, np.array(truncated, bool))


def sampling_seed(seed: int, step: int, prompt: int) -> int:
    """The seed a step samples one prompt's answers with: a function of where it is only, so
    a resumed run samples what the straight run did."""
    return int(np.random.SeedSequence([seed, step, prompt]).generate_state(1, np.uint64)[0] >> 1)


class GrpoRun(MethodRun):
    """The prompts, rewards and plan of a GRPO run. Creating it loads the reward functions and
    the prompts, reports them, then (a new run) writes the run folder with its config."""

    def __init__(self, engine, run_dir: Path, resume: bool, say, ranks: int = 1):
        cfg = engine.cfg
        self.t, self.say, self.tokenizer = cfg.train, say, engine.loaded.tokenizer
        if ranks > 1:
            raise ConfigError("train.method grpo: runs in one process for now; start it without "
                              "mlxtune launch or torchrun")  # fmt: skip
        self.rewards: list[Reward] = []
        if self.t.reward_functions:
            self.rewards = load_rewards(self.t.reward_functions, self.t.reward_weights)
        if self.t.reward_judge is not None:
            judge = Judge(self.t.reward_judge, self.t.judge_instructions)
            self.rewards.append(Reward("judge", judge, self.t.judge_weight))
        self.weights = np.array([r.weight for r in self.rewards])
        room = self.t.max_completion_tokens
        self.data = {"train": load_prompts(engine, cfg.data.train)}
        if cfg.data.valid:
            self.data["valid"] = load_prompts(engine, cfg.data.valid)
        for name, prompts in self.data.items():
            say(prompts.line(name, cfg.data.max_seq_len, room))
        say(f"rewards: {', '.join(f'{r.name} x {r.weight:g}' for r in self.rewards)}")
        self.run_dir, self.config_yaml = Path(run_dir), None if resume else cfg.to_yaml()
        self.train = self.data["train"]
        self.per_batch = self.t.batch_size or 1
        self.batching = Batching(cfg.data.max_seq_len, False, self.per_batch, None)
        self.lengths = np.array([len(e) for e in self.train.encoded], np.int64)
        self.total = total_steps(self.t, len(self.plan(0)))
        self.layout = {"ranks": 1, "batching": list(self.batching.key()), "method": "grpo",
                       "group_size": self.t.group_size}  # fmt: skip
        self.stops = frozenset(engine.loaded.stop_ids) | {self.tokenizer.eos_token_id}
        self.packing = cfg.data.packing and engine.masked

    def ready(self) -> None:
        """Write a new run's folder (its config), once the reward functions have scored
        answers once: a reward file that fails leaves nothing behind."""
        if self.config_yaml is not None:
            with atomic_folder(self.run_dir, replace=True) as tmp:
                (tmp / "config.yaml").write_text(self.config_yaml, encoding="utf-8")
            self.config_yaml = None

    def _plan(self, epoch: int) -> list[list[int]]:
        """Micro-batches of prompt indices."""
        plan = plan_epoch(self.lengths, self.batching, self.t.seed, epoch)
        return [[row[0] for row in batch] for batch in plan]

    def score(self, prompts: Prompts, indices: list[int], answers: Answers,
              group: int | None = None) -> Answers:  # fmt: skip
        """Every answer scored by the reward functions, and its advantage within its group
        (of `group` answers, default train.group_size)."""
        rows = [prompts.rows[indices[g]] for g in answers.group]
        completions = [text if row.plain else [{"role": "assistant", "content": text}]
                       for text, row in zip(answers.texts, rows, strict=True)]  # fmt: skip
        columns: dict[str, list] = {}
        for key in sorted({k for row in rows for k in row.columns}):
            columns[key] = [row.columns.get(key) for row in rows]
        ids = [e.ids[e.loss].tolist() for e in answers.examples]
        answers.per_func = score(self.rewards, [row.prompt for row in rows], completions, ids,
                                 columns)  # fmt: skip
        answers.advantages, answers.rewards = advantages(
            answers.per_func, self.weights, group or self.t.group_size, self.t.scale_rewards
        )
        return answers

    def micro_batches(self, answers: Answers, per_batch: list[int]) -> list[tuple]:
        """Each micro-batch's host arrays: the rows, the gathered answer tokens with their
        answer (in the step), advantage and weight, and the collated batch."""
        counts = answers.counts
        completions, tokens = len(answers.examples), int(counts.sum())
        out, start = [], 0
        for n in per_batch:  # answers of each micro-batch, in order
            idx = list(range(start, start + n))
            start += n
            lengths = np.array([len(answers.examples[i]) - 1 for i in idx])
            if self.packing:
                order = np.argsort(-lengths, kind="stable")
                rows = [[idx[j] for j in row] for row in
                        _first_fit(lengths, order, self.batching.max_seq_len)]  # fmt: skip
            else:
                rows = [[i] for i in idx]
            batch = collate(answers.examples, rows, self.batching.max_seq_len, ROW_MULTIPLE)
            owner = np.zeros(batch.inputs.shape, np.int64)  # which answer each position is
            for r, row in enumerate(rows):
                at = 0
                for i in row:
                    n_pos = len(answers.examples[i]) - 1
                    owner[r, at : at + n_pos] = i
                    at += n_pos
            out.append((batch, owner.reshape(-1)))
        return [(b, o, counts, completions, tokens) for b, o in out]

    def arrays(self, batch, owner, counts, completions, tokens, gather_positions,
               answers: Answers) -> tuple:  # fmt: skip
        """(inputs, segments, gather, targets, advantages, weights) of a micro-batch: numpy."""
        keep = batch.weights.reshape(-1) > 0
        gather = gather_positions(keep)
        real = np.arange(len(gather)) < int(keep.sum())
        owners = owner[gather]
        weights = token_weights(self.t, owners, counts, completions, tokens) * real
        adv = answers.advantages[owners] * real
        return (batch.inputs, batch.segments, gather, batch.targets.reshape(-1)[gather],
                adv.astype(np.float32), weights.astype(np.float32))  # fmt: skip

    def report(self, reporter, step: int, window: dict, lr: float, peak_gb: float,
               norm: float) -> None:  # fmt: skip
        """One progress report: the loss, then the rewards (mean, std, each function's mean),
        the KL to the base, the answers' length and the sampling speed."""
        elapsed = time.perf_counter() - window["t0"]
        answers = max(window["answers"], 1)
        per = {r.name: round(window[f"reward/{r.name}"] / max(window[f"n/{r.name}"], 1), 5)
               for r in self.rewards}  # fmt: skip
        mean = window["reward"] / answers
        std = max(window["reward_sq"] / answers - mean**2, 0.0) ** 0.5
        extra = {"reward": round(mean, 5), "reward_std": round(std, 5),
                 "rewards": per, "kl": round(window["kl"] / max(window["tokens"], 1), 6),
                 "completion_tokens": round(window["tokens"] / answers, 2),
                 "truncated": round(window["truncated"] / answers, 4),
                 "sampled_tokens_per_s": round(window["tokens"] / max(window["sampling_s"], 1e-9), 1)}  # fmt: skip
        reporter.train(step, window["loss"] / window["steps"], lr, window["real"] / elapsed,
                       window["real"] / max(window["slots"], 1), peak_gb,
                       elapsed / window["steps"], grad_norm=round(norm, 4),
                       elapsed_s=round(elapsed, 4), **extra)  # fmt: skip
        funcs = "  ".join(f"{k} {v:.3f}" for k, v in per.items())
        self.say(f"    reward {mean:.3f} +- {std:.3f} ({funcs})  kl {extra['kl']:.4f}  "
                 f"answer {extra['completion_tokens']:.1f} tokens  "
                 f"sampling {extra['sampled_tokens_per_s']:,.0f} tok/s")  # fmt: skip

    def add(self, window: dict, answers: Answers, sampling_s: float) -> None:
        """The step's answers into the report window's running sums."""
        rewards = np.nan_to_num(answers.rewards)
        window["answers"] = window.get("answers", 0) + len(rewards)
        window["reward"] = window.get("reward", 0.0) + float(rewards.sum())
        window["reward_sq"] = window.get("reward_sq", 0.0) + float((rewards**2).sum())
        window["truncated"] = window.get("truncated", 0) + int(answers.truncated.sum())
        window["sampling_s"] = window.get("sampling_s", 0.0) + sampling_s
        for j, r in enumerate(self.rewards):
            col = answers.per_func[:, j]
            window[f"reward/{r.name}"] = window.get(f"reward/{r.name}", 0.0) + float(np.nansum(col))
            window[f"n/{r.name}"] = window.get(f"n/{r.name}", 0) + int((~np.isnan(col)).sum())

    def report_valid(self, reporter, step: int, r: dict) -> None:
        reporter.log({"kind": "valid", "step": step, **r})
        funcs = "  ".join(f"{k} {v:.3f}" for k, v in r["rewards"].items())
        self.say(f"step {step}: validation reward {r['reward']:.3f} ({funcs}) over "
                 f"{r['prompts']} prompts, greedy")  # fmt: skip

    def valid_result(self, prompts: Prompts, answers: Answers) -> dict:
        per = {r.name: float(np.nanmean(answers.per_func[:, j])) if
               (~np.isnan(answers.per_func[:, j])).any() else None
               for j, r in enumerate(self.rewards)}  # fmt: skip
        rewards = np.nansum(answers.per_func * self.weights[None, :], axis=1)
        return {"reward": round(float(rewards.mean()), 6), "rewards": per,
                "prompts": len(prompts.rows)}  # fmt: skip


def sample_answers(engine, run: GrpoRun, prompts: Prompts, indices: list[int], seeds,
                   temperature: float, n: int, sample) -> Answers:  # fmt: skip
    """`n` answers to each prompt of `indices` (one seed per prompt; None for greedy), as
    training examples, by a backend's `sample(engine, prompt, n, max_tokens, temperature,
    seed, stops)`; dropout off while sampling."""
    model, t = engine.model, engine.cfg.train
    was = model.training
    model.eval()
    sampled = [sample(engine, prompts.encoded[i], n, t.max_completion_tokens, temperature, seed,
                      run.stops) for i, seed in zip(indices, seeds, strict=True)]  # fmt: skip
    model.train(was)
    return answers_of([prompts.encoded[i] for i in indices], sampled, run.stops,
                      run.tokenizer, t.max_completion_tokens)  # fmt: skip


def validate(engine, run: GrpoRun, prompts: Prompts, sample) -> dict:
    """The mean reward of one greedy answer to each validation prompt."""
    indices = list(range(len(prompts.rows)))
    answers = sample_answers(engine, run, prompts, indices, [None] * len(indices), 0.0, 1,
                             sample)  # fmt: skip
    return run.valid_result(prompts, run.score(prompts, indices, answers, group=1))


def sample_step(engine, run: GrpoRun, step: int, position, sample):
    """A step's prompts, sampled and scored (the run folder written once scoring worked):
    (micro-batches of prompt indices, the position after them, the answers, seconds spent
    sampling)."""
    t = run.t
    batches, position = run.batches(position)
    indices = [i for b in batches for i in b]
    seeds = [sampling_seed(t.seed, step, j) for j in range(len(indices))]
    start = time.perf_counter()
    answers = sample_answers(engine, run, run.train, indices, seeds, t.temperature,
                             t.group_size, sample)  # fmt: skip
    sampling_s = time.perf_counter() - start
    run.score(run.train, indices, answers)
    run.ready()
    return batches, position, answers, sampling_s


def validate_at_start(engine, run: GrpoRun, reporter, step: int, sample) -> None:
    """Step 0's validation, the reward to beat (the model as it starts); a new run's folder
    is written once it has scored."""
    if "valid" in run.data and step == 0:
        start = validate(engine, run, run.data["valid"], sample)
        run.ready()
        run.report_valid(reporter, 0, start)
