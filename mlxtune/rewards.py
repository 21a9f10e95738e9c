"""GRPO's rewards: the user's reward functions (`train.reward_functions`), their scores and
the group advantages, as TRL computes them. Framework-free (numpy).

A reward function is called as TRL calls it: `fn(prompts=[...], completions=[...],
completion_ids=[...], **columns)`, one entry per completion, where `prompts` and
`completions` are strings for string prompts and message lists for conversational ones, and
each column of the rows (every key but `prompt`) is a list too. It returns one float per
completion, or None to abstain; a completion every function abstains on gets advantage 0.
"""

from __future__ import annotations

import importlib.util
import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, MlxtuneError


class RewardError(MlxtuneError):
    """A reward function raised, or returned the wrong thing."""


@dataclass(frozen=True)
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0


def load_rewards(spec: str, weights: tuple[float, ...] = ()) -> list[Reward]:
    """The reward functions of `spec` (FILE, every public function defined in it, in file
    order; or FILE:name,name)."""
    key = "train.reward_functions"
    file, _, names = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path}: file not found")
    module_spec = importlib.util.spec_from_file_location(f"mlxtune_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error, named with its line
        raise ConfigError(f"{key}: {path}{_line_in(e, path)}: does not import: "
                          f"{type(e).__name__}: {e}") from None  # fmt: skip
    defined = {n: f for n, f in vars(module).items() if inspect.isfunction(f)
               and f.__module__ == module.__name__ and not n.startswith("_")}  # fmt: skip
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        for n in wanted:
            if n not in defined:
                have = ", ".join(defined) or "none"
                raise ConfigError(f"{key}: {path}: no function {n} (it defines: {have})")
        chosen = [(n, defined[n]) for n in wanted]
    else:
        chosen = sorted(defined.items(), key=lambda kv: kv[1].__code__.co_firstlineno)
    if not chosen:
        raise ConfigError(f"{key}: {path}: defines no public function")
    if weights and len(weights) != len(chosen):
        raise ConfigError(f"train.reward_weights: {len(weights)} weights for {len(chosen)} "
                          f"reward functions ({', '.join(n for n, _ in chosen)})")  # fmt: skip
    weights = weights or (1.0,) * len(chosen)
    return [Reward(n, f, float(w)) for (n, f), w in zip(chosen, weights, strict=True)]


def _line_in(error: BaseException, path: Path) -> str:
    """':LINE' of the deepest frame of the traceback in `path`, or ''."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f":{error.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if Path(f.filename).resolve() == path.resolve()]  # fmt: skip
    return f":{lines[-1]}" if lines else ""


def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list,
          columns: dict[str, list]) -> np.ndarray:  # fmt: skip
    """[completions, functions]: each function's rewards (NaN where it abstains)."""
    n = len(completions)
    out = np.full((n, len(rewards)), np.nan, np.float64)
    for j, r in enumerate(rewards):
        where = f"train.reward_functions: {r.name}"
        try:
            got = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                       **columns)  # fmt: skip
        except RewardError:
            raise
        except Exception as e:  # the user's code
            file = Path(inspect.getsourcefile(r.fn) or "?")
            raise RewardError(f"{where}{_at(e, file)}: raised {type(e).__name__}: {e}") from None
        if isinstance(got, np.ndarray):
            got = got.tolist()
        if not isinstance(got, list | tuple):
            raise RewardError(f"{where}: returned {type(got).__name__}, not a list of {n} values")
        if len(got) != n:
            raise RewardError(f"{where}: returned {len(got)} values for {n} completions")
        for i, v in enumerate(got):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
                raise RewardError(f"{where}: value {i} is {type(v).__name__}, not a number")
            out[i, j] = float(v)
    return out


def _at(error: BaseException, file: Path) -> str:
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if Path(f.filename).resolve() == file.resolve()]  # fmt: skip
    return f" ({file.name}:{lines[-1]})" if lines else ""


def advantages(per_func: np.ndarray, weights: np.ndarray, group: int,
               scale: str = "group") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(advantages, rewards) of completions in groups of `group` (TRL's sum_then_normalize):
    the weighted sum of the functions' rewards (NaN ones skipped), minus its group's mean,
    divided by the group's (or batch's) unbiased std + 1e-4 unless `scale` is "none"; a
    completion no function scored gets advantage 0."""
    unscored = np.isnan(per_func).all(axis=1)
    rewards = np.nansum(per_func * weights[None, :], axis=1)
    rewards[unscored] = np.nan
    grouped = rewards.reshape(-1, group)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.repeat(np.nanmean(grouped, axis=1), group)
        if scale == "batch":
            std = np.full_like(rewards, _nanstd(rewards))
        else:
            std = np.repeat(_nanstd(grouped, axis=1), group)
        out = rewards - mean
        if scale != "none":
            out = out / (std + 1e-4)
    return np.nan_to_num(out, nan=0.0), rewards


def _nanstd(x: np.ndarray, axis=None):
    """The unbiased std ignoring NaNs (TRL's nanstd): NaN with fewer than two values."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(x, axis=axis, ddof=1)


class Judge:
    """The reward `judge`: a model behind an OpenAI-compatible endpoint scores each answer from
    0 to 10 (the first number of its reply), all answers of a step asked in parallel through
    the fusion client; the reward is the score / 10, or None (abstain) where a call fails or
    the reply holds no number. Every call failing is an error."""

    def __init__(self, endpoint, instructions: str):
        self.endpoint, self.instructions = endpoint, instructions
        self.failed = 0

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        import asyncio

        return asyncio.run(self._ask(prompts, completions))

    async def _ask(self, prompts, completions) -> list[float | None]:
        import re

        from fusion.client import FusionClient

        from .config import FusionConfig

        jobs = [(self.endpoint, self._messages(p, c), 0.0, f"judge-{i}")
                for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]  # fmt: skip
        async with FusionClient(FusionConfig()) as client:
            calls = await client.gather(jobs)
        out: list[float | None] = []
        for call in calls:
            found = re.search(r"-?\d+(?:\.\d+)?", call.text) if call.ok else None
            out.append(None if found is None else min(max(float(found.group()), 0.0), 10.0) / 10)
        self.failed += sum(not c.ok for c in calls)
        if calls and all(not c.ok for c in calls):
            raise RewardError(f"train.reward_judge: every call failed ({calls[0].member}: "
                              f"{calls[0].error})")  # fmt: skip
        return out

    def _messages(self, prompt, completion) -> list[dict]:
        return [{"role": "system", "content": self.instructions},
                {"role": "user", "content": f"Prompt:\n{_text(prompt)}\n\nAnswer:\n"
                                            f"{_text(completion)}"}]  # fmt: skip


def _text(value) -> str:
    """A prompt or answer as plain text (messages joined; pictures and clips as [image])."""
    if isinstance(value, str):
        return value
    lines = []
    for message in value:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p["text"] if p["type"] == "text" else f"[{p['type']}]"
                               for p in content)  # fmt: skip
        lines.append(f"{message.get('role', 'user')}: {content or ''}")
    return "\n".join(lines)
