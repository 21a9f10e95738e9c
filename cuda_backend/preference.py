"""DPO and ORPO on PyTorch: the twin of mlxtune/preference.py, same config, pairs, losses
(mlxtune/pairloss.py), reference file and run folder. What is torch here: the model, the
per-token chunked cross-entropy, AdamW and the checkpoints."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from mlxtune.data.batching import media_arrays
from mlxtune.data.pairs import Pairs, host_arrays, nll_tokens, pair_batching, plan_pairs
from mlxtune.data.pairs import reference_logps as cached_reference
from mlxtune.pairloss import Ops, evaluate_scores, objective
from mlxtune.pairrun import PairRun, load_pairs
from mlxtune.progress import METRICS, Reporter, new_window, saved_window
from mlxtune.runs import write_final

from . import checkpoint, lora
from . import model as model_lib

TORCH = Ops(F.logsigmoid, torch.where, torch.log1p, torch.exp, torch.expm1, torch.log,
            lambda x, c: torch.clamp(x, min=c), lambda x, c: torch.clamp(x, max=c),
            torch.Tensor.detach, lambda b: b.float(), torch.minimum)  # fmt: skip
MULTIPLE = 64


class _TokenCE(torch.autograd.Function):
    """Each token's cross-entropy [N], the head run on `chunk` rows at a time; each row's
    gradient is formed in the forward pass, and backward scales it by the row's cotangent."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk):
        losses, grads = [], []
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                ce = F.cross_entropy(head(h).float(), targets[s : s + chunk], reduction="none")
                (g,) = torch.autograd.grad(ce.sum(), h)
            losses.append(ce.detach())
            grads.append(g)
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        (grads,) = ctx.saved_tensors
        return grads * grad_losses[:, None].to(grads.dtype), None, None, None


def forward_ce(engine, inputs, positions, gather, targets, media, grad=True,
               temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of each gathered position's target [N], from the logits divided by
    `temperature`."""
    model, split, chunk = engine.model, engine.split, engine.cfg.train.ce_chunk_tokens
    if split is None:
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False, **media).logits
        flat = logits.reshape(-1, logits.shape[-1])[gather].float() / temperature
        return F.cross_entropy(flat, targets, reduction="none")
    hidden = split.body(inputs, positions, media)
    hidden = hidden.reshape(-1, hidden.shape[-1])[gather]
    head = split.head if temperature == 1.0 else (lambda x: split.head(x).float() / temperature)
    if grad:
        return _TokenCE.apply(hidden, targets, head, chunk)
    return torch.cat([F.cross_entropy(head(hidden[s : s + chunk]).float(),
                                      targets[s : s + chunk], reduction="none")
                      for s in range(0, hidden.shape[0], chunk)])  # fmt: skip


def per_side(ce, owner, answer, whole, rows: int):
    """Each side's answer log-probability and tokens [pairs, 2], each pair's chosen-side NLL."""
    onehot = (owner[:, None] == torch.arange(rows, device=owner.device)[None, :]).float()
    logps = ((-ce) * answer) @ onehot
    return logps.reshape(-1, 2), (answer @ onehot).reshape(-1, 2), ((ce * whole) @ onehot)[0::2]


def pair_arrays(engine, pairs: Pairs, batch_pairs, reference, orpo: bool) -> tuple:
    """A micro-batch of pairs on the model's device, with its media."""
    where = engine.loaded.device
    gather = partial(_gather, multiple=MULTIPLE)
    (inputs, segments, gathered, targets, owner, answer, whole, ref), batch = host_arrays(
        pairs, batch_pairs, engine.cfg.data.max_seq_len, gather, reference, orpo)  # fmt: skip
    dtype = next(p for p in engine.model.parameters() if p.is_floating_point()).dtype
    media = model_lib.media_kwargs(media_arrays(batch.placed, batch.inputs.size, round_up=False),
                                   dtype, where)  # fmt: skip
    arrays = (inputs.astype(np.int64), model_lib.positions(segments), gathered.astype(np.int64),
              targets.astype(np.int64), owner.astype(np.int64), answer, whole, ref)  # fmt: skip
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(where) for a in arrays), media, batch


def _gather(keep: np.ndarray, multiple: int) -> np.ndarray:
    gather = np.flatnonzero(keep)
    size = max(-(-len(gather) // multiple) * multiple, multiple)
    return np.pad(gather, (0, size - len(gather)))


def pair_loss(engine, arrays, scales, media):
    """(scaled loss, metric sums) of a micro-batch of pairs."""
    inputs, positions, gather, targets, owner, answer, whole, ref = arrays
    ce = forward_ce(engine, inputs, positions, gather, targets, media)
    logps, counts, nll = per_side(ce, owner, answer, whole, inputs.shape[0])
    return objective(engine.cfg.train, logps, counts, nll, ref, scales, TORCH)


def scores(engine, pairs: Pairs, max_batches: int | None = None) -> dict[str, np.ndarray]:
    """Every pair under the model as it is now (`logps`, `counts` [pairs, 2], `nll`)."""
    cfg, model = engine.cfg, engine.model
    out = {"logps": np.zeros((len(pairs), 2), np.float32),
           "counts": np.zeros((len(pairs), 2), np.float32), "nll": np.zeros(len(pairs), np.float32)}  # fmt: skip
    was = model.training
    model.eval()
    plan = plan_pairs(pairs, pair_batching(cfg), 0, 0, shuffle=False)[:max_batches]
    with torch.no_grad():
        for batch_pairs in plan:
            arrays, media, _ = pair_arrays(engine, pairs, batch_pairs, None,
                                           cfg.train.method == "orpo")  # fmt: skip
            inputs, positions, gather, targets, owner, answer, whole, _ = arrays
            ce = forward_ce(engine, inputs, positions, gather, targets, media, grad=False)
            got = per_side(ce, owner, answer, whole, inputs.shape[0])
            for key, value in zip(("logps", "counts", "nll"), got, strict=True):
                out[key][batch_pairs] = value.float().cpu().numpy()
    model.train(was)
    if max_batches is not None:
        ran = sorted(p for b in plan for p in b)
        out = {k: v[ran] for k, v in out.items()} | {"pairs": np.array(ran)}
    return out


def evaluate_pairs(engine, pairs: Pairs, reference, max_batches: int | None = None) -> dict:
    got = scores(engine, pairs, max_batches)
    ran = got.pop("pairs", np.arange(len(pairs)))
    ref = None if reference is None else reference[ran]
    return evaluate_scores(engine.cfg.train, got, ref, nll_tokens(pairs, ran))


def evaluate_file(engine, path: str) -> dict:
    """How the model ranks a file's pairs (as mlxtune.preference.evaluate_file)."""
    logps = scores(engine, load_pairs(engine, path))["logps"]
    return {"pairs": len(logps), "choice_accuracy": float((logps[:, 0] > logps[:, 1]).mean()),
            "chosen_logps": float(logps[:, 0].mean()),
            "rejected_logps": float(logps[:, 1].mean())}  # fmt: skip


class Loop:
    """What the PyTorch preference and GRPO loops share (the twin of mlxtune.preference.Loop):
    AdamW (restored on resume) with the learning-rate schedule, the run state, backward and
    the clipped step, the reports, validations and checkpoints."""

    def __init__(self, engine, run, run_dir: Path, resume: bool, ranks, say, what: str):
        from .trainer import _reset_peak, _resume, schedule

        model, t = engine.model, engine.cfg.train
        self.engine, self.run, self.run_dir, self.say, self.t = engine, run, run_dir, say, t
        self.params = list(lora.trainable(model).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate,
                                           weight_decay=t.weight_decay)  # fmt: skip
        self.lr_at = schedule(t, run.total)
        self.state = checkpoint.RunState(layout=run.layout)
        if resume:
            self.state = _resume(run_dir, model, self.optimizer, run.batching, ranks, say)
            say(f"resuming {run_dir} at step {self.state.step}/{run.total}")
        say(f"training {lora.count(lora.trainable(model)):,} parameters "
            f"({engine.cfg.lora.method}, {len(engine.adapted)} modules) on "
            f"{engine.loaded.device}, {run.total} steps of {what}")  # fmt: skip
        self.reporter = Reporter(run_dir / METRICS, run.total, say)
        model.train()
        _reset_peak(engine)
        self.window = new_window(self.state.window)

    def start(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.t.learning_rate * self.lr_at(step - 1)

    def micro(self, batch, loss, sums) -> None:
        """One micro-batch's backward, and its metric sums into the report window."""
        loss.backward()
        for k, v in (sums | {"loss": loss}).items():
            self.window[k] = self.window.get(k, 0.0) + float(v.detach())
        self.window["real"] += batch.real_tokens
        self.window["slots"] += batch.inputs.size

    def finish(self, step: int, position, validate=None, add=None) -> None:
        """The clipped step, then its report, validation and checkpoint when due."""
        from .trainer import _peak_gb

        t, run, model, window = self.t, self.run, self.engine.model, self.window
        norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if add is not None:
            add(window)
        window["steps"] += 1
        if run.due(step, t.report_every):
            run.report(self.reporter, step, window, self.optimizer.param_groups[0]["lr"],
                       _peak_gb(self.engine), float(norm))  # fmt: skip
            self.window = new_window()
        if validate is not None and run.due(step, t.eval_every):
            run.report_valid(self.reporter, step, validate())
        if run.due(step, t.save_every):
            state = checkpoint.RunState(step, position, saved_window(self.window), run.layout)
            weights, moments = checkpoint.tensors(model, self.optimizer)
            checkpoint.save(self.run_dir, state, weights, moments,
                            partial(self.engine.write_adapter, weights=weights),
                            self.engine.cfg.output.keep_checkpoints)  # fmt: skip

    def end(self) -> Path:
        weights = checkpoint.tensors(self.engine.model)[0]
        write_final(self.run_dir, partial(self.engine.write_adapter, weights=weights))
        self.say(f"done: {self.run_dir}")
        return self.run_dir


def train_pairs(engine, run_dir: Path, resume: bool, say, ranks) -> Path:
    """Train on preference pairs: the MLX trainer's run, step for step."""
    run = PairRun(engine, run_dir, resume, say, ranks.size)
    t = engine.cfg.train
    reference = {}
    if t.method == "dpo":
        score = lambda pairs: scores(engine, pairs)["logps"]  # noqa: E731
        reference = cached_reference(run_dir, run.data, resume, score, say)
    loop = Loop(engine, run, run_dir, resume, ranks, say, t.method)
    validate = None
    if "valid" in run.data:
        validate = partial(evaluate_pairs, engine, run.data["valid"], reference.get("valid"),
                           t.eval_batches)  # fmt: skip
    position, step = loop.state.position, loop.state.step
    while step < run.total:
        step += 1
        loop.start(step)
        batches, scales, position = run.step(position)
        for batch_pairs in batches:
            arrays, media, batch = pair_arrays(engine, run.train, batch_pairs,
                                               reference.get("train"), t.method == "orpo")  # fmt: skip
            loop.micro(batch, *pair_loss(engine, arrays, scales, media))
        loop.finish(step, position, validate)
    return loop.end()
