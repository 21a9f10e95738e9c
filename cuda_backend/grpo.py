"""GRPO on PyTorch: the twin of mlxtune/grpo.py, same config, prompts, rewards, objective
(mlxtune/pairloss.py) and run folder. Sampling is transformers' `generate` (a group as
`num_return_sequences` of one prompt, seeded per step and prompt); the reference is the same
model with its trained parameters as they were at the run's start."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mlxtune.data.batching import media_arrays
from mlxtune.data.encode import Encoded
from mlxtune.errors import ConfigError
from mlxtune.grporun import GrpoRun, sample_step, validate, validate_at_start
from mlxtune.pairloss import grpo_objective

from . import lora
from . import model as model_lib
from .generate import _KnownIds
from .preference import TORCH, Loop, forward_ce


def sample(engine, prompt: Encoded, n: int, max_tokens: int, temperature: float,
           seed: int | None, stops: frozenset[int]) -> list[np.ndarray]:  # fmt: skip
    """`n` answers to one prompt (token ids), sampled by transformers' generate; temperature
    0 is greedy."""
    import transformers

    loaded = engine.loaded
    where = loaded.device
    dtype = next(p.dtype for p in loaded.model.parameters() if p.is_floating_point())
    media = {}
    if prompt.media:
        placed = [(m.start, m) for m in prompt.media]
        media = model_lib.media_kwargs(media_arrays(placed, len(prompt.ids), round_up=False),
                                       dtype, where)  # fmt: skip
    inputs = torch.tensor(prompt.ids.astype(np.int64)[None], device=where)
    stop = sorted(stops)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}  # fmt: skip
    torch.manual_seed(seed or 0)
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
            num_return_sequences=n, eos_token_id=stop, pad_token_id=stop[0],
            logits_processor=transformers.LogitsProcessorList([_KnownIds(len(loaded.tokenizer))]),
            **sampling, **media)  # fmt: skip
    tokens = out[:, inputs.shape[1] :].cpu().numpy()
    return [tokens[j] for j in range(n)]


def _device(engine, batch, host, reference=None) -> tuple:
    where = engine.loaded.device
    inputs, segments, gather, targets, adv, weights = host
    dtype = next(p for p in engine.model.parameters() if p.is_floating_point()).dtype
    media = model_lib.media_kwargs(media_arrays(batch.placed, batch.inputs.size, round_up=False),
                                   dtype, where)  # fmt: skip
    arrays = (inputs.astype(np.int64), model_lib.positions(segments), gather.astype(np.int64),
              targets.astype(np.int64), adv, weights)  # fmt: skip
    out = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(where) for a in arrays)
    return out, media


@contextlib.contextmanager
def weights_of(model, weights: dict):
    """The model with these trained parameters (the run's start) in place of its own."""
    params = lora.trainable(model)
    now = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(now[k])


def reference_logps(engine, batch, host, start: dict) -> np.ndarray:
    """The log-probs of the gathered answer tokens under the run's starting weights."""
    (inputs, positions, gather, targets, _, _), media = _device(engine, batch, host)
    with torch.no_grad(), weights_of(engine.model, start):
        ce = forward_ce(engine, inputs, positions, gather, targets, media, grad=False,
                        temperature=engine.cfg.train.temperature)  # fmt: skip
    return (-ce).float().cpu().numpy()


def micro_loss(engine, batch, host, reference) -> tuple[torch.Tensor, dict]:
    """(the micro-batch's share of the step's loss, KL and token sums), with gradients."""
    (inputs, positions, gather, targets, adv, weights), media = _device(engine, batch, host)
    ref = torch.from_numpy(np.asarray(reference, np.float32)).to(inputs.device)
    ce = forward_ce(engine, inputs, positions, gather, targets, media,
                    temperature=engine.cfg.train.temperature)  # fmt: skip
    return grpo_objective(engine.cfg.train, -ce, ref, adv, weights, TORCH)


def train_grpo(engine, run_dir: Path, resume: bool, say, ranks) -> Path:
    """Train with GRPO: the MLX trainer's run, step for step."""
    from mlxtune.trainer import gather_positions

    cfg, t = engine.cfg, engine.cfg.train
    if t.beta and cfg.lora.method == "full":
        raise ConfigError("train.beta: GRPO's KL needs the base model beside the trained one, "
                          "which full fine-tuning would hold twice; use LoRA or train.beta 0")  # fmt: skip
    run = GrpoRun(engine, run_dir, resume, say, ranks.size)
    start = {k: p.detach().clone() for k, p in lora.trainable(engine.model).items()}
    loop = Loop(engine, run, run_dir, resume, ranks, say,
                f"grpo, {t.group_size} answers per prompt")  # fmt: skip
    gather = partial(gather_positions, multiple=max(t.ce_chunk_tokens, 64))
    validate_now = partial(validate, engine, run, run.data.get("valid"), sample)
    position, step = loop.state.position, loop.state.step
    validate_at_start(engine, run, loop.reporter, step, sample)
    while step < run.total:
        step += 1
        loop.start(step)
        batches, position, answers, sampling_s = sample_step(engine, run, step, position, sample)
        for batch, owner, counts, completions, tokens in run.micro_batches(
                answers, [len(b) * t.group_size for b in batches]):  # fmt: skip
            host = run.arrays(batch, owner, counts, completions, tokens, gather, answers)
            reference = reference_logps(engine, batch, host, start) if t.beta else \
                np.zeros(len(host[2]), np.float32)  # fmt: skip
            loop.micro(batch, *micro_loss(engine, batch, host, reference))
        loop.finish(step, position, validate_now if "valid" in run.data else None,
                    partial(run.add, answers=answers, sampling_s=sampling_s))  # fmt: skip
    return loop.end()
