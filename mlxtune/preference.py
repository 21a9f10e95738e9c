"""DPO and ORPO on MLX, with TRL's losses (`train.method: dpo | orpo`).

A micro-batch holds whole pairs, each as two rows (chosen, rejected). Only the positions the
loss reads go through the head, as for SFT: each side's answer tokens (its log-probability is
their sum) and, for ORPO, every token of the chosen side (TRL's NLL term covers the prompt
too). With `train.ce_chunk_tokens` the head runs on a chunk at a time and keeps each token's
gradient with respect to its hidden state, so no [tokens x vocab] logits wait for the
backward pass.

DPO's reference is the policy at step 0: for a new adapter (B = 0) or a full fine-tune, the
base model itself. Its log-probabilities are computed once, in one forward pass over the train
and validation pairs before the first step, and kept in the run folder (`reference.npz`), so
no second model is held and a resumed run reads them back.

The loss of a step is the mean over its pairs (ORPO adds the NLL, the mean over the chosen
sides' tokens), however the pairs fall into micro-batches.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from . import checkpoint, lora
from .data.pairs import (
    Pairs,
    host_arrays,
    nll_tokens,
    pair_batching,
    plan_pairs,
    reference_logps,
)
from .pairloss import Ops, evaluate_scores, objective
from .pairrun import PairRun, load_pairs
from .progress import METRICS, Reporter, new_window, saved_window
from .runs import write_final

MLX = Ops(nn.log_sigmoid, mx.where, mx.log1p, mx.exp, mx.expm1, mx.log, mx.maximum, mx.minimum,
          mx.stop_gradient, lambda b: b.astype(mx.float32), mx.minimum)  # fmt: skip


def token_losses(head, chunk: int, grad: bool = True):
    """f(hidden [N, D], targets [N]) -> each token's cross-entropy [N] (fp32), the head run on
    `chunk` rows at a time. With `grad`, each row's gradient is formed in the forward pass (it
    depends on that row alone) and the backward pass scales it by the row's cotangent."""

    def one(x, t):
        logits = head(x).astype(mx.float32)
        ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t[:, None], -1)[:, 0]
        return ce.sum(), ce

    if not grad:
        return lambda h, t: mx.concatenate([one(h[s : s + chunk], t[s : s + chunk])[1]
                                            for s in range(0, h.shape[0], chunk)])  # fmt: skip

    @mx.custom_function
    def losses(h, t):
        ce, grads = [], []
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            if grads:  # one chunk after another, so one chunk's logits are alive at a time
                hc = mx.depends(hc, [ce[-1], grads[-1]])
            (_, c), dh = mx.value_and_grad(partial(one, t=t[s : s + chunk]))(hc)
            ce.append(c)
            grads.append(dh)
        return mx.concatenate(ce), mx.concatenate(grads)

    @losses.vjp
    def losses_vjp(primals, cotangents, outputs):
        h, t = primals
        return (outputs[1] * cotangents[0][:, None]).astype(h.dtype), mx.zeros_like(t)

    return lambda h, t: losses(h, t)[0]


def forward_ce(model, split, chunk, inputs, segments, gather, targets, media, masked=True,
               grad=True, temperature: float = 1.0) -> mx.array:  # fmt: skip
    """Cross-entropy of each gathered position's target [N], from the logits divided by
    `temperature` (GRPO's log-probs are those of the sampling distribution, as TRL's)."""
    from .model import packed_cache

    cache = packed_cache(model, segments) if masked else None
    if split is None:
        logits = model(inputs, cache=cache, **({"media": media} if media else {}))
        flat = logits.reshape(-1, logits.shape[-1])[gather].astype(mx.float32) / temperature
        return nn.losses.cross_entropy(flat, targets, reduction="none")
    hidden = split.body(inputs, cache, media)
    hidden = hidden.reshape(-1, hidden.shape[-1])[gather]
    head = split.head if temperature == 1.0 else (lambda x: split.head(x) / temperature)
    return token_losses(head, chunk or hidden.shape[0], grad)(hidden, targets)


def per_side(ce, owner, answer, whole, rows: int) -> tuple[mx.array, mx.array, mx.array]:
    """From token losses: each side's answer log-probability and answer tokens ([pairs, 2]
    each), and each pair's NLL summed over its chosen side's tokens (ORPO) [pairs]."""
    onehot = (owner[:, None] == mx.arange(rows)[None, :]).astype(mx.float32)
    logps = (((-ce) * answer) @ onehot).reshape(-1, 2)
    counts = (answer @ onehot).reshape(-1, 2)
    nll = ((ce * whole) @ onehot).reshape(-1, 2)[:, 0]
    return logps, counts, nll


def pair_loss(model, split, t, inputs, segments, gather, targets, owner, answer, whole,
              reference, scales, media, masked=True):  # fmt: skip
    """The training step's function of a micro-batch: (scaled loss, metric sums)."""
    ce = forward_ce(model, split, t.ce_chunk_tokens, inputs, segments, gather, targets, media,
                    masked)  # fmt: skip
    logps, counts, nll = per_side(ce, owner, answer, whole, inputs.shape[0])
    return objective(t, logps, counts, nll, reference, scales, MLX)


def pair_arrays(pairs: Pairs, batch_pairs: list[int], max_seq_len: int, multiple: int,
                reference: np.ndarray | None, orpo: bool, cache=None) -> tuple:  # fmt: skip
    """A micro-batch of pairs on device (`data.pairs.host_arrays`), its media, and the host
    batch."""
    from .trainer import gather_positions, media_of

    arrays, batch = host_arrays(pairs, batch_pairs, max_seq_len,
                                partial(gather_positions, multiple=multiple), reference, orpo)  # fmt: skip
    return tuple(mx.array(a) for a in arrays), media_of(batch, cache), batch


def scores(engine, pairs: Pairs, max_batches: int | None = None) -> dict[str, np.ndarray]:
    """Every pair under the model as it is now, without gradients: `logps` and `counts`
    [pairs, 2] (each side's answer log-probability and tokens), `nll` [pairs]."""
    cfg, model = engine.cfg, engine.model
    multiple = max(cfg.train.ce_chunk_tokens, 64)
    orpo = cfg.train.method == "orpo"
    out = {"logps": np.zeros((len(pairs), 2), np.float32),
           "counts": np.zeros((len(pairs), 2), np.float32), "nll": np.zeros(len(pairs), np.float32)}  # fmt: skip
    was = model.training
    model.eval()
    plan = plan_pairs(pairs, pair_batching(cfg), 0, 0, shuffle=False)[:max_batches]
    for batch_pairs in plan:
        arrays, media, _ = pair_arrays(pairs, batch_pairs, cfg.data.max_seq_len, multiple,
                                       None, orpo, engine.soft)  # fmt: skip
        inputs, segments, gather, targets, owner, answer, whole, _ = arrays
        ce = forward_ce(model, engine.split, cfg.train.ce_chunk_tokens, inputs, segments, gather,
                        targets, media, engine.masked, grad=False)  # fmt: skip
        got = per_side(ce, owner, answer, whole, inputs.shape[0])
        mx.eval(got)
        for key, value in zip(("logps", "counts", "nll"), got, strict=True):
            out[key][batch_pairs] = np.array(value)
    model.train(was)
    if max_batches is not None:  # only the pairs that were run
        ran = sorted(p for b in plan for p in b)
        out = {k: v[ran] for k, v in out.items()} | {"pairs": np.array(ran)}
    return out


def evaluate_pairs(engine, pairs: Pairs, reference: np.ndarray | None,
                   max_batches: int | None = None) -> dict:  # fmt: skip
    """The mean pair loss and metrics over `pairs` (TRL's rewards/... as `margin`, `accuracy`,
    `chosen_reward`, ...) and `choice_accuracy` (`pairloss.evaluate_scores`)."""
    got = scores(engine, pairs, max_batches)
    ran = got.pop("pairs", np.arange(len(pairs)))
    ref = None if reference is None else reference[ran]
    return evaluate_scores(engine.cfg.train, got, ref, nll_tokens(pairs, ran))


class Loop:
    """What the MLX preference and GRPO loops share: AdamW (restored on resume), the run
    state, the compiled loss-and-gradients of `loss(model, split, t, *arrays, masked=...)` and
    the compiled clipped update, the reports, validations and checkpoints."""

    def __init__(self, engine, run, run_dir: Path, resume: bool, ranks, say, what: str, loss):
        from .trainer import _resume, schedule

        model, t = engine.model, engine.cfg.train
        self.engine, self.run, self.run_dir, self.say, self.t = engine, run, run_dir, say, t
        optimizer = optim.AdamW(learning_rate=schedule(t, run.total), weight_decay=t.weight_decay)
        optimizer.init(model.trainable_parameters())
        self.optimizer = optimizer
        self.state = checkpoint.RunState(layout=run.layout)
        if resume:
            self.state = _resume(run_dir, model, optimizer, run.batching, ranks, say)
            say(f"resuming {run_dir} at step {self.state.step}/{run.total}")
        say(f"training {lora.count(lora.trainable(model)):,} parameters "
            f"({engine.cfg.lora.method}, {len(engine.adapted)} modules), {run.total} steps of "
            f"{what}")  # fmt: skip

        @partial(mx.compile, inputs=[model.state, optimizer.state],
                 outputs=[model.state, optimizer.state])  # fmt: skip
        def update(grads):
            norm = mx.array(0.0)
            if t.max_grad_norm:
                grads, norm = optim.clip_grad_norm(grads, t.max_grad_norm)
            optimizer.update(model, grads)
            return norm

        self.update = update
        step_loss = partial(loss, model, engine.split, t, masked=engine.masked)
        traced = [model.state, mx.random.state]
        self.micro_fn = mx.compile(nn.value_and_grad(model, step_loss), inputs=traced,
                                   outputs=traced)  # fmt: skip
        self.reporter = Reporter(run_dir / METRICS, run.total, say)
        model.train()
        mx.reset_peak_memory()
        self.window = new_window(self.state.window)
        self.grads, self.sums = None, {}

    def micro(self, batch, *arrays) -> None:
        """One micro-batch's gradients and metric sums, added to the step's."""
        (loss, got), g = self.micro_fn(*arrays)
        self.grads = g if self.grads is None else tree_map(mx.add, self.grads, g)
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in (got | {"loss": loss}).items()}
        self.window["real"] += batch.real_tokens
        self.window["slots"] += batch.inputs.size

    def finish(self, step: int, position, validate=None, add=None) -> None:
        """The step's update, then its report, validation (`validate()` -> the result) and
        checkpoint when due; `add(window)` puts a method's own sums in the report window."""
        model, t, run, window = self.engine.model, self.t, self.run, self.window
        norm = self.update(self.grads)
        mx.eval(model.state, self.optimizer.state, norm, self.sums)
        for k, v in self.sums.items():
            window[k] = window.get(k, 0.0) + v.item()
        self.grads, self.sums = None, {}
        if add is not None:
            add(window)
        window["steps"] += 1
        if run.due(step, t.report_every):
            run.report(self.reporter, step, window, self.optimizer.learning_rate.item(),
                       mx.get_peak_memory() / 1e9, norm.item())  # fmt: skip
            self.window = new_window()
        if validate is not None and run.due(step, t.eval_every):
            run.report_valid(self.reporter, step, validate())
        if run.due(step, t.save_every):
            state = checkpoint.RunState(step, position, saved_window(self.window), run.layout)
            checkpoint.save(self.run_dir, state, model, self.optimizer,
                            self.engine.write_adapter, self.engine.cfg.output.keep_checkpoints)  # fmt: skip

    def end(self) -> Path:
        write_final(self.run_dir, self.engine.write_adapter)
        self.say(f"done: {self.run_dir}")
        return self.run_dir


def train_pairs(engine, run_dir: Path, resume: bool, say, ranks) -> Path:
    """Train `engine` on preference pairs (DPO or ORPO): the SFT trainer's progress lines,
    checkpoints and exact resume, with the pair metrics in metrics.jsonl."""
    run = PairRun(engine, run_dir, resume, say, ranks.size)
    cfg, t = engine.cfg, engine.cfg.train
    reference = {}
    if t.method == "dpo":
        score = lambda pairs: scores(engine, pairs)["logps"]  # noqa: E731
        reference = reference_logps(run_dir, run.data, resume, score, say)
    loop = Loop(engine, run, run_dir, resume, ranks, say, t.method, pair_loss)
    multiple = max(t.ce_chunk_tokens, 64)
    validate = None
    if "valid" in run.data:
        validate = partial(evaluate_pairs, engine, run.data["valid"], reference.get("valid"),
                           t.eval_batches)  # fmt: skip
    position, step = loop.state.position, loop.state.step
    while step < run.total:
        step += 1
        batches, scales, position = run.step(position)
        for batch_pairs in batches:
            arrays, media, batch = pair_arrays(run.train, batch_pairs, cfg.data.max_seq_len,
                                               multiple, reference.get("train"),
                                               t.method == "orpo", engine.soft)  # fmt: skip
            loop.micro(batch, *arrays, mx.array(scales), media)
        loop.finish(step, position, validate)
    return loop.end()


def evaluate_file(engine, path: str) -> dict:
    """How `engine`'s model ranks the pairs of a file: `choice_accuracy` (the share of pairs
    whose chosen answer it finds likelier) and the mean log-probabilities of each side."""
    pairs = load_pairs(engine, path)
    logps = scores(engine, pairs)["logps"]
    return {"pairs": len(pairs), "choice_accuracy": float((logps[:, 0] > logps[:, 1]).mean()),
            "chosen_logps": float(logps[:, 0].mean()),
            "rejected_logps": float(logps[:, 1].mean())}  # fmt: skip
