"""GRPO on MLX (`train.method: grpo`): sampling with the KV cache, a group at a time, then TRL's
clipped objective on the sampled answers (mlxtune/pairloss.py), the rest as for SFT.

The `group_size` answers to a prompt are sampled together, as one batch of identical prompts
(the prompt's images and clips embedded once), through mlx-lm's KV cache. Each step's sampling
keys come from (train.seed, step, prompt), so a resumed run samples what the straight run
did. With train.beta > 0, the reference log-probs come from the same model with its adapters
as they were at the run's start (the base for a new adapter, `model.adapter` when training on
from one), run without gradients: no second model in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .data.encode import Encoded
from .errors import ConfigError
from .grporun import GrpoRun, sample_step, validate, validate_at_start
from .pairloss import grpo_objective
from .preference import MLX, Loop, forward_ce


def sample(engine, prompt: Encoded, n: int, max_tokens: int, temperature: float,
           seed: int | None, stops: frozenset[int]) -> list[np.ndarray]:  # fmt: skip
    """`n` answers to one prompt (token ids, each up to its first stop token or `max_tokens`),
    sampled together with the KV cache from `seed`; temperature 0 is greedy."""
    from mlx_lm.models.cache import make_prompt_cache

    from .data.batching import media_arrays

    model = engine.model
    known = len(engine.loaded.tokenizer)
    ids = mx.array(prompt.ids)[None]
    kwargs = {}
    if prompt.media:
        placed = [(m.start, m) for m in prompt.media]
        media = {k: mx.array(v) for k, v in media_arrays(placed, len(prompt.ids)).items()}
        kwargs["input_embeddings"] = mx.repeat(model.embed(ids, media), n, axis=0)
    cache = make_prompt_cache(model)
    logits = model(mx.repeat(ids, n, axis=0), cache=cache, **kwargs)[:, -1, :]
    stop = mx.array(sorted(stops))
    out, done = [], mx.zeros((n,), dtype=mx.bool_)
    keys = mx.random.split(mx.random.key(seed or 0), max_tokens) if temperature > 0 else None
    for i in range(max_tokens):
        logits = logits.astype(mx.float32)
        if logits.shape[-1] > known:  # ids past the tokenizer's (padded vocabularies)
            logits = mx.where(mx.arange(logits.shape[-1]) < known, logits, -mx.inf)
        if temperature > 0:
            token = mx.random.categorical(logits / temperature, key=keys[i])
        else:
            token = mx.argmax(logits, axis=-1)
        out.append(token)
        done = done | (token[:, None] == stop[None, :]).any(axis=-1)
        mx.eval(token, done)
        if done.all().item():
            break
        logits = model(token[:, None], cache=cache)[:, -1, :]
    tokens = np.array(mx.stack(out, axis=1))
    return [tokens[j] for j in range(n)]


@contextmanager
def weights_of(model: nn.Module, weights: dict):
    """The model with these trained parameters (the run's start: GRPO's reference) in place of
    its own; put back on exit."""
    now = dict(tree_flatten(model.trainable_parameters()))
    model.update(tree_unflatten(list(weights.items())))
    try:
        yield model
    finally:
        model.update(tree_unflatten(list(now.items())))


def grpo_loss(model, split, t, inputs, segments, gather, targets, advantages, weights,
              reference, media, masked=True):  # fmt: skip
    """(the micro-batch's share of the step's loss, KL and token sums)."""
    ce = forward_ce(model, split, t.ce_chunk_tokens, inputs, segments, gather, targets, media,
                    masked, temperature=t.temperature)  # fmt: skip
    return grpo_objective(t, -ce, reference, advantages, weights, MLX)


def train_grpo(engine, run_dir: Path, resume: bool, say, ranks) -> Path:
    """Train `engine` with GRPO: the SFT trainer's progress lines, checkpoints and exact
    resume, with the rewards in metrics.jsonl."""
    from .trainer import gather_positions, media_of

    cfg, model, t = engine.cfg, engine.model, engine.cfg.train
    if t.beta and cfg.lora.method == "full":
        raise ConfigError("train.beta: GRPO's KL needs the base model beside the trained one, "
                          "which full fine-tuning would hold twice; use LoRA or train.beta 0")  # fmt: skip
    run = GrpoRun(engine, run_dir, resume, say, ranks.size)
    start = dict(tree_flatten(model.trainable_parameters()))  # before a resume restores any
    loop = Loop(engine, run, run_dir, resume, ranks, say,
                f"grpo, {t.group_size} answers per prompt", grpo_loss)  # fmt: skip
    gather = partial(gather_positions, multiple=max(t.ce_chunk_tokens, 64))
    validate_now = partial(validate, engine, run, run.data.get("valid"), sample)
    position, step = loop.state.position, loop.state.step
    validate_at_start(engine, run, loop.reporter, step, sample)
    while step < run.total:
        step += 1
        batches, position, answers, sampling_s = sample_step(engine, run, step, position, sample)
        parts = run.micro_batches(answers, [len(b) * t.group_size for b in batches])
        for batch, owner, counts, completions, tokens in parts:
            host = run.arrays(batch, owner, counts, completions, tokens, gather, answers)
            arrays = tuple(mx.array(a) for a in host)
            media = media_of(batch, engine.soft)
            reference = mx.zeros(arrays[2].shape, mx.float32)
            if t.beta:
                with weights_of(model, start):
                    reference = -forward_ce(model, engine.split, t.ce_chunk_tokens, *arrays[:4],
                                            media, engine.masked, grad=False,
                                            temperature=t.temperature)  # fmt: skip
                    mx.eval(reference)
            loop.micro(batch, *arrays, reference, media)
        loop.finish(step, position, validate_now if "valid" in run.data else None,
                    partial(run.add, answers=answers, sampling_s=sampling_s))  # fmt: skip
    return loop.end()
