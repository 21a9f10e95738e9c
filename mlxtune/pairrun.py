"""What the MLX and PyTorch preference trainers share: the pairs, the plan of micro-batches,
the step's counts and the reports. Framework-free."""

from __future__ import annotations

import time
from pathlib import Path

from .data.batching import Position
from .data.pairs import Pairs, nll_tokens, pair_batching, plan_pairs, prepare_pairs, read_pairs
from .errors import ConfigError
from .io import atomic_folder
from .runs import total_steps

SUMS = ("pairs", "margin", "accuracy", "chosen_logps", "rejected_logps", "chosen_reward",
        "rejected_reward", "nll", "choice")  # fmt: skip


def load_pairs(engine, path: str) -> Pairs:
    """The pairs of a JSONL file, encoded for `engine`'s model (its template and media)."""
    d = engine.cfg.data
    return prepare_pairs(read_pairs(path), engine.loaded.tokenizer, d.max_seq_len, d.overlong,
                         engine.loaded.stop_ids, engine.media)  # fmt: skip


class MethodRun:
    """What a preference or GRPO run plans: micro-batches per epoch (`_plan`, a pure function
    of the seed and epoch), `train.grad_accum` of them per step."""

    t = None
    total = 0

    def _plan(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in getattr(self, "_plans", {}):
            self._plans = {epoch: self._plan(epoch)}
        return self._plans[epoch]

    def batches(self, position: Position) -> tuple[list[list[int]], Position]:
        """The micro-batches of the step at `position`, and the position after it."""
        out = []
        for _ in range(self.t.grad_accum):
            out.append(self.plan(position.epoch)[position.index])
            after = Position(position.epoch, position.index + 1)
            position = after if after.index < len(self.plan(position.epoch)) else Position(
                position.epoch + 1, 0)  # fmt: skip
        return out, position

    def due(self, step: int, every: int) -> bool:
        return step == self.total or bool(every and step % every == 0)


class PairRun(MethodRun):
    """The data and plan of a preference run. Creating it loads and reports the pairs, then
    (a new run) writes the run folder with its config."""

    def __init__(self, engine, run_dir: Path, resume: bool, say, ranks: int = 1):
        cfg = engine.cfg
        self.t, self.say = cfg.train, say
        if ranks > 1:
            raise ConfigError(f"train.method {self.t.method}: runs in one process for now; "
                              "start it without mlxtune launch or torchrun")  # fmt: skip
        d = cfg.data
        self.data = {"train": load_pairs(engine, d.train)}
        if d.valid:
            self.data["valid"] = load_pairs(engine, d.valid)
        for name, pairs in self.data.items():
            say(pairs.stats.line(name, d.max_seq_len))
        if not resume:  # created only now that the model and the data have loaded
            with atomic_folder(run_dir, replace=True) as tmp:
                (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        self.train = self.data["train"]
        self.batching = pair_batching(cfg)
        self.total = total_steps(self.t, len(self.plan(0)))
        self.layout = {"ranks": 1, "batching": list(self.batching.key()), "method": self.t.method}

    def _plan(self, epoch: int) -> list[list[int]]:
        return plan_pairs(self.train, self.batching, self.t.seed, epoch)

    def step(self, position: Position) -> tuple[list[list[int]], list[float], Position]:
        """The micro-batches (pair indices) of the step at `position`, its scales [1 / pairs,
        1 / ORPO's NLL tokens], and the position after it."""
        batches, position = self.batches(position)
        whole = sum(nll_tokens(self.train, b) for b in batches)
        return batches, [1.0 / sum(map(len, batches)), 1.0 / max(whole, 1)], position

    def report(self, reporter, step: int, window: dict, lr: float, peak_gb: float,
               norm: float) -> None:  # fmt: skip
        """One progress report from a window of plain numbers (sums since the last one)."""
        elapsed = time.perf_counter() - window["t0"]
        pairs = max(float(window["pairs"]), 1.0)
        extra = {k: round(float(window[k]) / pairs, 5) for k in SUMS if k != "pairs"}
        extra["choice_accuracy"] = extra.pop("choice")
        if self.t.method == "dpo":
            extra.pop("nll")
        reporter.train(step, float(window["loss"]) / window["steps"], lr,
                       window["real"] / elapsed, window["real"] / window["slots"], peak_gb,
                       elapsed / window["steps"], grad_norm=round(norm, 4),
                       elapsed_s=round(elapsed, 4), pairs=int(window["pairs"]), **extra)  # fmt: skip
        self.say(f"    margin {extra['margin']:+.3f}  accuracy {extra['accuracy']:.0%}  "
                 f"chosen {extra['chosen_logps']:.2f}  rejected {extra['rejected_logps']:.2f}")  # fmt: skip

    def report_valid(self, reporter, step: int, r: dict) -> None:
        reporter.log({"kind": "valid", "step": step,
                      **{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}})  # fmt: skip
        self.say(f"step {step}: validation loss {r['loss']:.3f}  margin {r['margin']:+.3f}  "
                 f"accuracy {r['accuracy']:.0%}  prefers chosen {r['choice_accuracy']:.0%}")  # fmt: skip
