"""The preference and reward losses (TRL's DPO loss types, ORPO, GRPO's clipped objective)
and their metrics, written once for any array library: MLX and torch in training (with
gradients), numpy in evaluation. Framework-free.

`Ops` names the few functions the libraries spell differently; everything else is operators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

LN2 = 0.6931471805599453


@dataclass(frozen=True)
class Ops:
    log_sigmoid: Callable
    where: Callable
    log1p: Callable
    exp: Callable
    expm1: Callable
    log: Callable
    maximum: Callable  # (array, float) -> array
    minimum: Callable  # (array, float) -> array
    detach: Callable
    as_float: Callable  # a boolean array as 0.0 / 1.0
    pairwise_min: Callable  # (array, array) -> array


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


NUMPY = Ops(_np_log_sigmoid, np.where, np.log1p, np.exp, np.expm1, np.log, np.maximum,
            np.minimum, lambda x: x, lambda b: b.astype(np.float32), np.minimum)  # fmt: skip


def log1mexp(x, ops: Ops):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO)."""
    x = ops.minimum(x, -1e-7)
    return ops.where(x < -LN2, ops.log1p(-ops.exp(x)), ops.log(-ops.expm1(x)))


def dpo_losses(kind: str, beta: float, smoothing: float, chosen, rejected, counts, ops: Ops):
    """Per-pair DPO loss from each side's log-ratio policy / reference (TRL's loss types;
    `sigmoid` with label smoothing is conservative DPO, TRL's older sigmoid)."""
    d = chosen - rejected
    if kind == "sigmoid":
        return -(1 - smoothing) * ops.log_sigmoid(beta * d) - smoothing * ops.log_sigmoid(-beta * d)
    if kind == "robust":
        return (-(1 - smoothing) * ops.log_sigmoid(beta * d)
                + smoothing * ops.log_sigmoid(-beta * d)) / (1 - 2 * smoothing)  # fmt: skip
    if kind == "hinge":
        return ops.maximum(1 - beta * d, 0.0)
    if kind == "ipo":  # per answer token, as TRL's
        avg = chosen / ops.maximum(counts[:, 0], 1.0) - rejected / ops.maximum(counts[:, 1], 1.0)
        return (avg - 1 / (2 * beta)) ** 2
    raise ValueError(kind)


def objective(t, logps, counts, nll, reference, scales, ops: Ops) -> tuple[Any, dict]:
    """(the loss, divided by the step's counts `scales` = [1 / pairs, 1 / NLL tokens], and
    running sums for the metrics) of pairs with these per-side answer log-probabilities
    `logps` and answer tokens `counts` ([pairs, 2]), `nll` (each pair's chosen-side token
    losses summed, for ORPO) and `reference` ([pairs, 2], DPO). `t` is the train config
    (method, beta, dpo_loss, label_smoothing). A pair without answer tokens is padding."""
    chosen, rejected = logps[:, 0], logps[:, 1]
    real = ops.as_float(counts[:, 0] > 0)
    sums = {"pairs": real.sum(), "chosen_logps": (chosen * real).sum(),
            "rejected_logps": (rejected * real).sum(), "nll": (real * 0.0).sum(),
            "choice": (ops.as_float(chosen > rejected) * real).sum()}  # fmt: skip
    if t.method == "dpo":
        rc, rr = chosen - reference[:, 0], rejected - reference[:, 1]
        per = dpo_losses(t.dpo_loss, t.beta, t.label_smoothing, rc, rr, counts, ops)
        loss = (per * real).sum() * scales[0]
        rewards = (t.beta * ops.detach(rc), t.beta * ops.detach(rr))
    else:  # orpo, as TRL's: the chosen side's NLL minus beta x log sigmoid(log odds ratio)
        avg_c = chosen / ops.maximum(counts[:, 0], 1.0)
        avg_r = rejected / ops.maximum(counts[:, 1], 1.0)
        log_odds = (avg_c - avg_r) - (log1mexp(avg_c, ops) - log1mexp(avg_r, ops))
        odds = (ops.log_sigmoid(log_odds) * real).sum()
        loss = (nll * real).sum() * scales[1] - t.beta * odds * scales[0]
        rewards = (t.beta * ops.detach(avg_c), t.beta * ops.detach(avg_r))
        sums["nll"] = ops.detach((nll * real).sum())
    sums["chosen_reward"] = (rewards[0] * real).sum()
    sums["rejected_reward"] = (rewards[1] * real).sum()
    sums["margin"] = sums["chosen_reward"] - sums["rejected_reward"]
    sums["accuracy"] = (ops.as_float(rewards[0] > rewards[1]) * real).sum()
    return loss, sums


METRICS = ("margin", "accuracy", "chosen_reward", "rejected_reward", "chosen_logps",
           "rejected_logps")  # fmt: skip


def evaluate_scores(t, got: dict[str, np.ndarray], reference: np.ndarray | None,
                    whole_tokens: int) -> dict:  # fmt: skip
    """The mean pair loss and metrics of scored pairs (`got`: logps, counts, nll), and
    `choice_accuracy`, the share of pairs whose chosen answer the model finds likelier."""
    n = len(got["logps"])
    ref = np.zeros_like(got["logps"]) if reference is None else reference
    scales = np.array([1 / n, 1 / max(whole_tokens, 1)], np.float64)
    loss, sums = objective(t, got["logps"].astype(np.float64), got["counts"], got["nll"], ref,
                           scales, NUMPY)  # fmt: skip
    out = {"loss": float(loss), "pairs": n, "choice_accuracy": float(sums["choice"]) / n}
    return out | {k: float(sums[k]) / n for k in METRICS}


def grpo_objective(t, logps, reference, advantages, weights, ops: Ops) -> tuple[Any, dict]:
    """GRPO's clipped objective (TRL's grpo / bnpo / dr_grpo / dapo, one sampling pass per
    step, so the old policy is the current one): per gathered answer token, its
    temperature-scaled log-prob `logps`, the reference's (`reference`, used when beta > 0),
    its answer's advantage, and `weights`, the token's share of the step's loss (how the
    loss type averages; 0 on padding). Returns (loss, sums of the KL and of the tokens)."""
    ratio = ops.exp(logps - ops.detach(logps))  # 1, with the policy gradient
    clipped = ops.maximum(ops.minimum(ratio, 1 + t.clip_epsilon), 1 - t.clip_epsilon)
    per = -ops.pairwise_min(ratio * advantages, clipped * advantages)
    real = ops.as_float(weights > 0)
    kl = (real * 0.0).sum()
    if t.beta:  # k3, times the ratio (1) so its gradient is the reverse KL's (TRL's default)
        d = reference - logps
        per_kl = ops.exp(d) - d - 1
        per = per + t.beta * per_kl * ratio
        kl = ops.detach((per_kl * real).sum())
    return (per * weights).sum(), {"kl": kl, "tokens": real.sum()}


def token_weights(t, owners, counts: np.ndarray, completions: int, tokens: int) -> np.ndarray:
    """Each gathered answer token's share of the step's loss (`grpo_objective`'s weights):
    `owners` is its answer's index in the step, `counts` each answer's tokens; `completions`
    and `tokens` the step's totals. grpo: the mean over answers of each answer's token mean;
    bnpo and dapo: the mean over the step's tokens; dr_grpo: the sum over the step's tokens
    divided by answers x max_completion_tokens."""
    owners = np.asarray(owners)
    if t.grpo_loss == "grpo":
        return 1.0 / (np.maximum(counts[owners], 1) * completions)
    if t.grpo_loss == "dr_grpo":
        return np.full(len(owners), 1.0 / (completions * t.max_completion_tokens))
    return np.full(len(owners), 1.0 / max(tokens, 1))
