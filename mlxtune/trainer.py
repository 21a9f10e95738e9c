"""train() and evaluate(): plain functions, one compiled step, explicit state.

The loss of a step is the mean over every target token of its micro-batches (sum of token
losses / number of target tokens), so packing, batch size and accumulation do not change it.
Only positions that carry loss go through the head: the host gathers their indices, so prompt
tokens cost no [vocab]-wide work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import adapters, checkpoint, lora
from . import model as model_lib
from .config import Config, TrainConfig
from .data.batching import (
    Batch,
    Batching,
    DataOf,
    Dataset,
    Stream,
    collate,
    media_arrays,
    plan_epoch,
    soft_block,
    split_rows,
)
from .distributed import check_fingerprints, checkpoint_to_all, fingerprint, resumed_state
from .errors import ConfigError, ModelError
from .io import atomic_folder
from .progress import METRICS, Reporter, new_window, saved_window
from .ranks import Ranks
from .runs import check_run_dir, total_steps, write_final

GATHER_MULTIPLE = 64  # loss positions pad up to this (or to the chunk), bounding compiled shapes
GATHER_MIN = 16  # ... or, when fewer, to a power of two from this: short answers stay cheap


@dataclass
class Engine(DataOf):
    """A model ready to train or evaluate: loaded, adapted, split for the chunked loss."""

    loaded: model_lib.Loaded
    cfg: Config
    adapted: list[str]  # MLX module paths that carry LoRA (or whole blocks, for `full`)
    hf_names: dict[str, str]  # MLX module path -> the checkpoint's module name
    split: model_lib.Split | None
    masked: bool = True  # attention takes the segment mask (packed rows; see packs_exactly)
    notes: list[str] = field(default_factory=list)  # told to the user before training
    soft: object = None  # a multimodal model's SoftTokenCache (frozen towers' outputs)

    def adapter(self) -> adapters.Adapter:
        """The trained LoRA tensors in PEFT's layout, under the checkpoint's module names; any
        other trained parameter (an embedder trained in full) under its checkpoint name."""
        params = lora.trainable(self.model)
        modules = {}
        for path in self.adapted:
            m = params.pop(f"{path}.m", None)
            modules[self.hf_names[path]] = adapters.LoraTensors(
                np.array(params.pop(f"{path}.lora_a")).T,
                np.array(params.pop(f"{path}.lora_b")).T,
                None if m is None else np.array(m),
            )
        full = {self.hf_names[k]: np.array(v.astype(mx.float32)) for k, v in params.items()}
        return adapters.Adapter(self.cfg.lora, modules, str(self.cfg.model.path), full)

    def write_adapter(self, folder: Path) -> None:
        if self.cfg.lora.method == "full":
            mx.save_safetensors(str(folder / "trainable.safetensors"), lora.trainable(self.model))
        else:
            adapters.save(folder, self.adapter())


def settle_checkpointing(cfg: Config, ranks: int = 1) -> tuple[Config, str | None]:
    """train.grad_checkpoint `auto` decided by the memory plan against train.memory_gb, or this
    machine's memory (a Mac's GPU working set, else its RAM)."""
    from . import env, plan

    if cfg.train.memory_gb is not None:
        return plan.settle(cfg, cfg.train.memory_gb, ranks=ranks)
    size = mx.device_info().get("max_recommended_working_set_size") or env.memory_bytes()[0]
    return plan.settle(cfg, size / plan.GIB if size else None, ranks=ranks)


def setup(cfg: Config, adapter: str | Path | None = None, trainable: bool = False) -> Engine:
    """Load the model and adapt it: fresh LoRA layers from cfg.lora, or a saved adapter
    (`trainable`: its LoRA layers train on, as model.adapter asks)."""
    loaded = model_lib.load(cfg.model)
    notes: list[str] = []  # things the user should hear about
    mx.random.seed(cfg.train.seed)  # LoRA's A matrices are drawn here
    if adapter is not None:
        cfg, adapted, hf_names = attach(loaded, cfg, Path(adapter))
        if trainable:  # its LoRA / DoRA layers train on (embedders trained in full stay)
            loaded.model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    else:
        adapted = lora.apply(loaded.model, cfg.lora, loaded.model_type)
        hf_names = {}
        if cfg.lora.method != "full":
            tensors = list(adapters.tensor_shapes(loaded.path))
            theirs = [k.removesuffix(".weight") for k in tensors]
            hf_names = adapters.match_names(adapted, theirs)
            lora_leaves = {f"{p}.{leaf}" for p in adapted for leaf in ("lora_a", "lora_b", "m")}
            trained = [k for k in lora.trainable(loaded.model) if k not in lora_leaves]
            hf_names |= adapters.match_names(trained, tensors)
    if cfg.train.grad_checkpoint is True:  # "auto" is decided before training (settle)
        model_lib.checkpoint_layers(loaded.model)
    chunked = cfg.train.ce_chunk_tokens and cfg.lora.method != "full"
    split = model_lib.split_head(loaded.model) if chunked else None
    masked = model_lib.packs_exactly(loaded.model)
    if cfg.data.packing and not masked:
        cfg = replace(cfg, data=replace(cfg.data, packing=False))
        notes.append("packing off: packed examples do not match them run alone for this model")
    # One example per row needs no mask array: causal attention never lets a real token see
    # the padding after it, and the attention runs on its fused path. A model that opens image
    # blocks both ways (Gemma 4) still takes the mask, which carries the blocks.
    opens_images = getattr(loaded.model, "bidirectional", False)
    masked = masked and (cfg.data.packing or bool(opens_images))
    soft = None
    if hasattr(loaded.model, "tower_frozen"):
        from .models._towers import SoftTokenCache

        soft = SoftTokenCache(loaded.model, int(cfg.train.media_cache_gb * 2**30))
    return Engine(loaded, cfg, adapted, hf_names, split, masked, notes, soft)


def attach(loaded: model_lib.Loaded, cfg: Config, folder: Path):
    """Put a saved adapter (PEFT layout, or a full fine-tune's weights) onto the model."""
    model = loaded.model
    model.freeze()
    full = folder / "trainable.safetensors"
    if full.is_file() and not (folder / adapters.WEIGHTS).is_file():
        model.load_weights(str(full), strict=False)
        return replace(cfg, lora=replace(cfg.lora, method="full")), [], {}
    saved = adapters.load(folder)
    try:
        to_mlx = adapters.match_names(list(saved.modules), lora.linear_paths(model))
        ours = [k for k, _ in tree_flatten(model.parameters())]
        full = {adapters.match_names([hf], ours)[hf]: v for hf, v in saved.full.items()}
    except ModelError as e:
        raise ModelError(f"{folder}: adapter does not match the model: {e}") from None
    lora.swap(model, list(to_mlx.values()), saved.lora)
    params = lora.trainable(model)
    weights = []
    for hf, path in to_mlx.items():
        t = saved.modules[hf]
        pairs = [("lora_a", t.a.T), ("lora_b", t.b.T)] + (
            [("m", t.magnitude)] * (t.magnitude is not None)
        )
        for leaf, value in pairs:
            if params[f"{path}.{leaf}"].shape != value.shape:
                raise ModelError(
                    f"{folder}: adapter does not match the model: {hf}.{leaf} has shape "
                    f"{value.shape}, the model's layer needs {params[f'{path}.{leaf}'].shape}"
                )
            weights.append((f"{path}.{leaf}", mx.array(value)))
    params = dict(tree_flatten(model.parameters()))
    weights += [(k, mx.array(v).astype(params[k].dtype)) for k, v in full.items()]
    model.load_weights(weights, strict=False)
    model.freeze()
    names = {v: k for k, v in to_mlx.items()} | {v: k for k, v in
                                                  zip(full, saved.full, strict=True)}  # fmt: skip
    lora_cfg = replace(saved.lora, train_embedders=bool(full))
    return replace(cfg, lora=lora_cfg), list(to_mlx.values()), names


def batch_loss(model, split, chunk, inputs, segments, gather, targets, weights, media,
               grad=True, masked=True):  # fmt: skip
    """Sum of token losses at the gathered positions (weights 0 on padding entries).
    `media` is the batch's images and audio (an empty dict for text). `grad=False` skips the
    chunked loss's gradient work (evaluation). `masked=False` runs the model without the
    packed-attention mask: rows then hold one example each, right-padded, and causal attention
    never lets a real token see the padding after it."""
    cache = model_lib.packed_cache(model, segments) if masked else None
    if split is None:
        logits = model(inputs, cache=cache, **({"media": media} if media else {}))
        flat = logits.reshape(-1, logits.shape[-1])[gather]
        ce = nn.losses.cross_entropy(flat.astype(mx.float32), targets, reduction="none")
        return (ce * weights).sum()
    hidden = split.body(inputs, cache, media)
    hidden = hidden.reshape(-1, hidden.shape[-1])[gather]
    from .loss import chunked_loss

    return chunked_loss(split.head, chunk, grad)(hidden, targets, weights)


def device_arrays(batch: Batch, multiple: int, cache=None) -> tuple:
    """The micro-batch on device, with the loss positions gathered on the host. With a
    `SoftTokenCache`, the soft tokens of frozen towers come from it, not from the step."""
    w = batch.weights.reshape(-1)
    gather = gather_positions(w > 0, multiple)
    weights = np.zeros(len(gather), np.float32)
    weights[: int((w > 0).sum())] = 1.0
    targets = batch.targets.reshape(-1)[gather]
    arrays = (batch.inputs, batch.segments, gather, targets, weights)
    return (*map(mx.array, arrays), media_of(batch, cache))


def gather_positions(keep: np.ndarray, multiple: int) -> np.ndarray:
    """Flat indices where `keep` holds, padded (with index 0) to a multiple of `multiple`, or
    to a power of two from GATHER_MIN when fewer: few compiled shapes."""
    gather = np.flatnonzero(keep)
    n = len(gather)
    size = (
        -(-n // multiple) * multiple if n > multiple else max(GATHER_MIN, 1 << (n - 1).bit_length())
    )
    return np.pad(gather, (0, size - n)).astype(np.int32)


def media_of(batch: Batch, cache=None) -> dict:
    """The batch's images and audio as the model takes them (empty for text); with a
    `SoftTokenCache`, frozen towers' soft tokens come from it."""
    soft = {}
    for kind in cache.kinds if cache is not None else ():
        items = [m for _, m in batch.placed if m.kind == kind]
        if items:
            soft[kind] = cache.rows(items)
    media = media_arrays(batch.placed, batch.inputs.size, {k: len(v) for k, v in soft.items()})
    media = {k: mx.array(v) for k, v in media.items()}
    for kind, rows in soft.items():
        media[f"{kind}_soft"] = mx.pad(rows, [(0, soft_block(len(rows)) - len(rows)), (0, 0)])
    return media


def schedule(t: TrainConfig, total: int) -> Callable:
    decay = max(total - t.warmup_steps, 1)
    peak = t.learning_rate
    main = {
        "cosine": optim.cosine_decay(peak, decay, 0.0),
        "linear": optim.linear_schedule(peak, 0.0, decay),
        "constant": optim.linear_schedule(peak, peak, decay),
    }[t.lr_schedule]
    if not t.warmup_steps:
        return main
    return optim.join_schedules(
        [optim.linear_schedule(0.0, peak, t.warmup_steps), main], [t.warmup_steps]
    )


def evaluate(engine: Engine, data: Dataset, max_batches: int | None = None,
             ranks: Ranks | None = None) -> dict:  # fmt: skip
    """Validation loss (mean over target tokens) and perplexity. With several ranks, each runs
    its share of every batch and the sums are added up."""
    model, cfg = engine.model, engine.cfg
    was_training = model.training
    model.eval()
    multiple = max(cfg.train.ce_chunk_tokens, GATHER_MULTIPLE)
    chunk = cfg.train.ce_chunk_tokens
    fn = partial(batch_loss, model, engine.split, chunk, grad=False, masked=engine.masked)
    size, rank = (ranks.size, ranks.rank) if ranks else (1, 0)
    batching = Batching.of(cfg, size)
    total, tokens = mx.array(0.0), 0
    for rows in plan_epoch(data.lengths, batching, 0, 0, shuffle=False)[:max_batches]:
        tokens += int(data.loss_counts[[i for row in rows for i in row]].sum())
        mine = split_rows(rows, data.lengths, size)[rank]
        if mine:
            batch = collate(data.examples, mine, batching.max_seq_len)
            total = total + fn(*device_arrays(batch, multiple, engine.soft))
            mx.eval(total)
    total = (ranks.sum(total) if ranks else total).item()
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def train(cfg: Config, resume: bool = False, echo: Callable[[str], None] | None = None) -> Path:
    """Fine-tune as `cfg` says; returns the run folder. `resume` continues cfg.output.dir.

    Under `mlx.launch` each rank runs its share of every micro-batch (see distributed.py);
    rank 0 alone writes the run folder and prints progress."""
    ranks = Ranks()
    ranks.run_dir = cfg.output.dir
    try:
        return _train(cfg, resume, echo, ranks)
    except RuntimeError as e:
        lost = ranks.lost(e)
        if lost is None:
            raise
        raise lost from None
    finally:
        ranks.release()


def _train(cfg: Config, resume: bool, echo, ranks: Ranks) -> Path:
    main = ranks.main
    run_dir = check_run_dir(cfg, resume) if main else Path(cfg.output.dir)
    if not cfg.data.train:
        raise ConfigError("data.train: not set")
    cfg, checkpointing = settle_checkpointing(cfg, ranks.size)
    engine = setup(cfg, cfg.model.adapter, trainable=True) if cfg.model.adapter else setup(cfg)
    cfg = engine.cfg  # setup may turn packing off for a model that cannot pack
    model, t = engine.model, cfg.train
    loud = echo or (lambda line: print(line, flush=True))
    say = loud if main else (lambda line: None)
    for note in engine.notes + [checkpointing] * bool(checkpointing):
        say(f"note: {note}")
    if t.method == "grpo":
        from .grpo import train_grpo

        return train_grpo(engine, run_dir, resume, say, ranks)
    if t.method != "sft":
        from .preference import train_pairs

        return train_pairs(engine, run_dir, resume, say, ranks)
    train_data = engine.dataset(cfg.data.train)
    valid_data = engine.dataset(cfg.data.valid) if cfg.data.valid else None
    for name, data in (("train", train_data), ("valid", valid_data)):
        if data is not None:
            say(data.stats.line(name, cfg.data.max_seq_len))
    if ranks.size > 1:
        check_fingerprints(ranks.gather_ints(fingerprint(train_data.examples, engine.loaded.path)))
    if main and not resume:  # created only now that the model and the data have loaded
        with atomic_folder(run_dir, replace=True) as tmp:
            (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    batching = Batching.of(cfg, ranks.size)
    stream = Stream(train_data, batching, t.seed)
    total = total_steps(t, len(stream.plan(0)))
    optimizer = optim.AdamW(learning_rate=schedule(t, total), weight_decay=t.weight_decay)
    optimizer.init(model.trainable_parameters())
    layout = {"ranks": ranks.size, "batching": list(batching.key())}
    state = checkpoint.RunState(layout=layout)
    if resume:
        state = _resume(run_dir, model, optimizer, batching, ranks, say)
        say(f"resuming {run_dir} at step {state.step}/{total}")
        if state.step >= total:
            say(f"nothing to do: the run is at step {state.step}; raise train.iters to go on")
        state = replace(state, layout=layout)
    elif ranks.size > 1:  # the same LoRA start on every rank, whatever its RNG gave
        model.update(ranks.broadcast(model.trainable_parameters()))
    n_params = lora.count(lora.trainable(model))
    split = f", {ranks.size} data-parallel ranks" if ranks.size > 1 else ""
    say(f"training {n_params:,} parameters ({cfg.lora.method}, {len(engine.adapted)} modules), "
        f"{total} steps{split}" + ("" if engine.split else "; loss on full logits"))  # fmt: skip

    chunk, multiple = t.ce_chunk_tokens, max(t.ce_chunk_tokens, GATHER_MULTIPLE)
    step_loss = partial(batch_loss, model, engine.split, chunk, masked=engine.masked)
    loss_and_grad = nn.value_and_grad(model, step_loss)
    # value_and_grad writes the traced parameters into the model: model.state must be an output
    traced = [model.state, mx.random.state]
    micro = mx.compile(loss_and_grad, inputs=traced, outputs=traced)

    @partial(
        mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state]
    )
    def update(grads, inv_tokens):
        # Each rank's sum of token gradients over its share, summed over ranks, divided by the
        # global count of target tokens: the update of one process running the whole batch.
        grads = ranks.gradients(tree_map(lambda g: g * inv_tokens, grads))
        norm = mx.array(0.0)
        if t.max_grad_norm:
            grads, norm = optim.clip_grad_norm(grads, t.max_grad_norm)
        optimizer.update(model, grads)
        return norm

    reporter = Reporter(run_dir / METRICS, total, say, write=main)
    model.train()
    mx.reset_peak_memory()
    window = new_window(state.window)
    window["loss"] = mx.array(window["loss"])  # summed on the device, read at report time
    position, step = state.position, state.step
    while step < total:
        step += 1
        grads, step_tokens = None, 0
        for _ in range(t.grad_accum):
            share, position = stream.share(position, ranks.rank, ranks.size)
            if share.batch is None:  # no row for this rank: it adds nothing to the sums
                loss = mx.array(0.0)
                g = tree_map(mx.zeros_like, model.trainable_parameters())
            else:
                loss, g = micro(*device_arrays(share.batch, multiple, engine.soft))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            window["loss"] = window["loss"] + loss
            step_tokens += share.loss_tokens
            window["real"] += share.real_tokens
            window["slots"] += share.slots
        window["tokens"] += step_tokens
        window["steps"] += 1
        norm = update(grads, mx.array(1.0 / step_tokens))
        mx.eval(model.state, optimizer.state, window["loss"], norm)
        lr = optimizer.learning_rate  # the rate this step applied
        if step % t.report_every == 0 or step == total:
            loss_sum = ranks.sum(window["loss"]).item()
            peak = ranks.max(mx.array(mx.get_peak_memory() / 1e9)).item()
            elapsed = time.perf_counter() - window["t0"]
            reporter.train(step, loss_sum / window["tokens"], lr.item(),
                           window["real"] / elapsed, window["real"] / window["slots"],
                           peak, elapsed / window["steps"],
                           grad_norm=round(norm.item(), 4), loss_tokens=window["tokens"],
                           real_tokens=window["real"], elapsed_s=round(elapsed, 4))  # fmt: skip
            window = new_window()
            window["loss"] = mx.array(0.0)
        if valid_data is not None and (
            step == total or (t.eval_every and step % t.eval_every == 0)
        ):
            r = evaluate(engine, valid_data, t.eval_batches, ranks)
            reporter.valid(step, r["loss"], r["perplexity"], r["tokens"])
        if step == total or (t.save_every and step % t.save_every == 0):
            state = checkpoint.RunState(step, position, saved_window(window), layout)
            if ranks.size > 1:  # a checkpoint holds the window's loss summed over ranks
                state.window["loss"] = ranks.sum(mx.array(state.window["loss"])).item()
            if main:
                checkpoint.save(run_dir, state, model, optimizer, engine.write_adapter,
                                cfg.output.keep_checkpoints)  # fmt: skip
    if main:
        write_final(run_dir, engine.write_adapter)
    say(f"done: {run_dir}")
    return run_dir


def _resume(run_dir: Path, model, optimizer, batching: Batching, ranks: Ranks, say):
    """Rank 0 restores the newest checkpoint and hands it to every rank; a run resumed on
    another number of ranks must plan the same global batches (distributed.check_resume)."""
    restore = partial(checkpoint.restore, model=model, optimizer=optimizer)
    answer = checkpoint_to_all(
        ranks,
        run_dir,
        restore,
        batching,
        ranks.broadcast_json,
        lambda: {"rng": np.array(mx.random.state[0]).tolist()},
    )
    if ranks.size > 1:
        model.update(ranks.broadcast(model.trainable_parameters()))
        optimizer.state = ranks.broadcast(optimizer.state)
        hi, lo = answer["rng"]
        mx.random.seed((hi << 32) | lo)
    return resumed_state(ranks, run_dir, answer, say)
