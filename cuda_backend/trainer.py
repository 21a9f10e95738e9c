"""train() and evaluate() on PyTorch: the twin of mlxtune/trainer.py, same config, same run folder.

The data (rows, chat templates, packing, pictures and audio), the adapter files, the metrics,
the run folder and the step count are the MLX engine's own, framework-free code. What is torch
here: the model (transformers), LoRA (`lora.LoRALinear`), the chunked loss, AdamW, checkpoints.
The loss of a step is the mean over every target token of its micro-batches; only positions that
carry loss go through the head. Packed examples get position ids that restart at each example,
from which transformers builds per-example attention masks.

Under torchrun (WORLD_SIZE > 1) the training is data-parallel, as the MLX engine's: every rank
plans the same global micro-batches (`Batching.of(cfg, ranks)`), runs its share of each
(`Stream.share`), and the trained parameters' gradients, over the global count of target
tokens, are summed over the ranks in one flat all-reduce (`ranks.Ranks.gradients`); every rank
then takes the same clipped AdamW step. Rank 0 alone writes the run folder and prints.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlxtune import adapters
from mlxtune.config import Config, TrainConfig
from mlxtune.data.batching import (
    Batch,
    Batching,
    DataOf,
    Dataset,
    Position,
    Share,
    Stream,
    collate,
    media_arrays,
    plan_epoch,
    split_rows,
)
from mlxtune.distributed import check_fingerprints, checkpoint_to_all, fingerprint, resumed_state
from mlxtune.errors import ConfigError, ModelError
from mlxtune.io import atomic_folder
from mlxtune.plan.cuda import uses_cache
from mlxtune.progress import METRICS, Reporter, new_window, saved_window
from mlxtune.runs import check_run_dir, total_steps, write_final

from . import assemble, checkpoint, lora, prepare, shard
from . import model as model_lib
from .loss import chunked_loss
from .ranks import Ranks

GATHER_MULTIPLE = 64


@dataclass
class Engine(DataOf):
    """A model ready to train or evaluate: loaded, adapted, split for the chunked loss."""

    loaded: model_lib.Loaded
    cfg: Config
    adapted: list[str]
    hf_names: dict[str, str]  # module path -> the checkpoint's module name
    split: model_lib.Split | None
    notes: list[str] = field(default_factory=list)

    def adapter(self, weights: dict[str, torch.Tensor] | None = None) -> adapters.Adapter:
        """The trained LoRA tensors in PEFT's layout, under the checkpoint's module names; any
        other trained parameter (an embedder trained in full) under its checkpoint name.
        `weights`: the trained parameters by name (`checkpoint.tensors`), else the model's."""
        values = lora.trainable(self.model) if weights is None else weights

        def array(name: str) -> np.ndarray:
            return values[name].detach().float().cpu().numpy()

        modules = {}
        for path in self.adapted:
            layer = self.model.get_submodule(path)
            modules[self.hf_names[path]] = adapters.LoraTensors(
                array(f"{path}.lora_A"),
                array(f"{path}.lora_B"),
                None if layer.m is None else array(f"{path}.m"),
            )
        full = {self.hf_names[k]: array(k) for k in _full_params(self.model)}
        return adapters.Adapter(self.cfg.lora, modules, str(self.cfg.model.path), full)

    def write_adapter(self, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The adapter files (or trainable.safetensors of a full fine-tune) into `folder`."""
        if self.cfg.lora.method == "full":
            from safetensors.torch import save_file

            values = lora.trainable(self.model) if weights is None else weights
            save_file({k: p.detach().cpu().contiguous() for k, p in values.items()},
                      str(folder / "trainable.safetensors"))  # fmt: skip
        else:
            adapters.save(folder, self.adapter(weights))


def setup(cfg: Config, adapter: str | Path | None = None, trainable: bool = False) -> Engine:
    """Load the model and adapt it: fresh LoRA layers from cfg.lora, or a saved adapter
    (`trainable`: its LoRA layers train on, as model.adapter asks)."""
    loaded = model_lib.load(cfg.model)
    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices are drawn here
    if adapter is not None:
        cfg, adapted, hf_names = attach(loaded, cfg, Path(adapter))
        if trainable:  # its LoRA / DoRA layers train on (embedders trained in full stay)
            for name, param in loaded.model.named_parameters():
                if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "m"):
                    param.requires_grad_(True)
    else:
        adapted = lora.apply(loaded.model, cfg.lora, loaded.model_type)
        hf_names = {}
        if cfg.lora.method != "full":
            theirs = [
                k.removesuffix(".weight")
                for k in adapters.tensor_shapes(loaded.path)
                if k.startswith(loaded.prefix)
            ]  # Llama 4 text-only: not the vision tower
            hf_names = adapters.match_names(adapted, theirs)
            tensors = [
                k for k in adapters.tensor_shapes(loaded.path) if k.startswith(loaded.prefix)
            ]
            hf_names |= adapters.match_names(list(_full_params(loaded.model)), tensors)
    if cfg.train.grad_checkpoint is True:  # "auto" is decided before training (settle)
        loaded.model.gradient_checkpointing_enable({"use_reentrant": False})
        for store in loaded.stores:
            store.replay = True
    chunked = cfg.train.ce_chunk_tokens and cfg.lora.method != "full"
    split = model_lib.split_head(loaded.model) if chunked else None
    return Engine(loaded, cfg, adapted, hf_names, split)


def attach(loaded: model_lib.Loaded, cfg: Config, folder: Path):
    """Put a saved adapter (PEFT layout, from either backend, or PEFT itself) onto the model."""
    model = loaded.model
    model.requires_grad_(False)
    full = folder / "trainable.safetensors"
    if full.is_file() and not (folder / adapters.WEIGHTS).is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(full)), strict=False)
        return replace(cfg, lora=replace(cfg.lora, method="full")), [], {}
    saved = adapters.load(folder)
    try:
        to_ours = adapters.match_names(list(saved.modules), lora.linear_paths(model))
    except ModelError as e:
        raise ModelError(f"{folder}: adapter does not match the model: {e}") from None
    lora.swap(model, list(to_ours.values()), saved.lora)
    with torch.no_grad():
        for hf, path in to_ours.items():
            layer, t = model.get_submodule(path), saved.modules[hf]
            pairs = [(layer.lora_A, t.a), (layer.lora_B, t.b)] + (
                [(layer.m, t.magnitude)] if t.magnitude is not None else [])  # fmt: skip
            for param, value in pairs:
                if tuple(param.shape) != tuple(value.shape):
                    raise ModelError(f"{folder}: adapter does not match the model: {hf} has "
                                     f"shape {value.shape}, the layer needs {tuple(param.shape)}")  # fmt: skip
                param.copy_(torch.from_numpy(np.asarray(value)).to(param.device, param.dtype))
        try:  # modules PEFT saves in full (modules_to_save): the embedders
            ours = adapters.match_names(list(saved.full), [n for n, _ in model.named_parameters()])
        except ModelError as e:
            raise ModelError(f"{folder}: adapter does not match the model: {e}") from None
        params = dict(model.named_parameters())
        for hf, name in ours.items():
            params[name].copy_(torch.from_numpy(np.asarray(saved.full[hf])).to(params[name]))
    model.requires_grad_(False)
    return replace(cfg, lora=saved.lora), list(to_ours.values()), {v: k for k, v in to_ours.items()}


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained parameters that are not LoRA's (lora.train_embedders)."""
    leaves = (".lora_A", ".lora_B", ".m")
    return {k: p for k, p in lora.trainable(model).items() if not k.endswith(leaves)}


def check_fits(cfg: Config, ranks: int = 1) -> tuple[Config, str | None]:
    """Refuse, before anything loads, a run that `mlxtune plan` says will not fit this machine
    (its GPU, or on a CPU its RAM) in any phase: preparing, loading or training. Returns `cfg`
    with train.grad_checkpoint `auto` decided by the same plan, and the line saying so. With
    `ranks` data-parallel ranks, the plan is each rank's (on its GPU, or the CPU), and the
    ranks on this machine (torchrun's LOCAL_WORLD_SIZE) share its RAM."""
    from mlxtune import env, plan

    total, available = env.memory_bytes()
    host = total or available  # the machine's RAM, as `mlxtune plan` counts it
    if ranks > 1:
        host = host and host / max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    on_cpu = not torch.cuda.is_available()
    gpu = None
    if not on_cpu:
        device = torch.cuda.current_device()  # this rank's GPU under torchrun
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)
        gpu = torch.cuda.get_device_properties(device).total_memory * get_fraction(device)
        gpu /= plan.GIB
    host_gb = host / plan.GIB if host else None
    if cfg.train.memory_gb is not None:  # the user's budget for the step, on the GPU or the CPU
        gpu, host_gb = (gpu, cfg.train.memory_gb) if on_cpu else (cfg.train.memory_gb, host_gb)
    cfg, why = plan.settle(cfg, gpu, host_gb, on_cpu, ranks=ranks)
    try:
        p = plan.plan(cfg, gpu, host_gb, on_cpu=on_cpu, ranks=ranks)
    except (KeyError, TypeError, ValueError):  # a config the planner has no formula for
        return cfg, why
    if not p.fits:
        reasons = "; ".join(x.strip() for x in p.verdict().splitlines() if "fit" in x)
        raise ConfigError(f"plan: {reasons} (mlxtune plan CONFIG shows each part)")
    return cfg, why


def batch_loss(engine: Engine, inputs, positions, gather, targets, weights, media, grad=True):
    """Sum of token losses at the gathered positions (weights 0 on padding entries)."""
    model, split = engine.model, engine.split
    if split is None:
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False, **media).logits
        flat = logits.reshape(-1, logits.shape[-1])[gather]
        ce = nn.functional.cross_entropy(flat.float(), targets, reduction="none")
        return (ce * weights).sum()
    hidden = split.body(inputs, positions, media)
    hidden = hidden.reshape(-1, hidden.shape[-1])[gather]
    return chunked_loss(split.head, engine.cfg.train.ce_chunk_tokens, grad)(
        hidden, targets, weights
    )


def device_arrays(engine: Engine, batch: Batch, multiple: int) -> tuple:
    """The micro-batch on the model's device, loss positions gathered on the host."""
    where = engine.loaded.device
    w = batch.weights.reshape(-1)
    gather = np.flatnonzero(w)
    size = max(-(-len(gather) // multiple) * multiple, multiple)
    gather = np.pad(gather, (0, size - len(gather)))
    weights = np.zeros(size, np.float32)
    weights[: int((w > 0).sum())] = 1.0
    targets = batch.targets.reshape(-1)[gather]
    dtype = next(p for p in engine.model.parameters() if p.is_floating_point()).dtype
    packed = media_arrays(batch.placed, batch.inputs.size, round_up=False)
    media = model_lib.media_kwargs(packed, dtype, where)
    arrays = (batch.inputs.astype(np.int64), model_lib.positions(batch.segments),
              gather.astype(np.int64), targets.astype(np.int64), weights)  # fmt: skip
    return (*(torch.from_numpy(a).to(where) for a in arrays), media)


def schedule(t: TrainConfig, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: warmup, then cosine / linear / constant."""
    decay = max(total - t.warmup_steps, 1)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return step / t.warmup_steps
        done = min((step - t.warmup_steps) / decay, 1.0)
        if t.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0 - done if t.lr_schedule == "linear" else 1.0

    return factor


def evaluate(engine: Engine, data: Dataset, max_batches: int | None = None,
             ranks: Ranks | None = None) -> dict:  # fmt: skip
    """Validation loss (mean over target tokens) and perplexity. With several ranks, each runs
    its share of every batch (the global plan of `Batching.of(cfg, ranks)`) and the sums are
    added up; a sharded model's rank with no row runs one anyway, for FSDP's gathers."""
    cfg, model = engine.cfg, engine.model
    was_training = model.training
    model.eval()
    size, rank = (ranks.size, ranks.rank) if ranks else (1, 0)
    sharded = shard.is_sharded(model)
    batching = Batching.of(cfg, size)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for rows in plan_epoch(data.lengths, batching, 0, 0, shuffle=False)[:max_batches]:
            tokens += int(data.loss_counts[[i for row in rows for i in row]].sum())
            mine = rows if size == 1 else split_rows(rows, data.lengths, size)[rank]
            if mine or sharded:
                batch = collate(data.examples, mine or rows[:1], batching.max_seq_len)
                loss = float(batch_loss(engine, *device_arrays(engine, batch, GATHER_MULTIPLE),
                                        grad=False))  # fmt: skip
                total += loss if mine else 0.0
    total = ranks.sum(total) if ranks else total
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def train(cfg: Config, resume: bool = False, echo: Callable[[str], None] | None = None) -> Path:
    """Fine-tune as `cfg` says; returns the run folder. `resume` continues cfg.output.dir.

    Under torchrun each rank runs its share of every micro-batch (mlxtune/distributed.py);
    rank 0 alone writes the run folder and prints progress."""
    ranks = Ranks.start(on_cuda=model_lib.device().type == "cuda")
    ranks.run_dir = cfg.output.dir
    failed = True
    try:
        run_dir = _train(cfg, resume, echo, ranks)
        failed = False
        return run_dir
    except RuntimeError as e:
        lost = ranks.lost(e)
        if lost is None:
            raise
        raise lost from None
    finally:
        ranks.close(failed)


def _share(stream: Stream, position: Position, ranks: Ranks) -> tuple[Share, Position]:
    """This rank's share of the next micro-batch; one process takes the whole batch, as
    before (its rows in the plan's order)."""
    if ranks.size > 1:
        return stream.share(position, ranks.rank, ranks.size)
    batch, position = stream.take(position)
    return Share(batch, batch.loss_tokens, batch.real_tokens, batch.inputs.size), position


def _train(cfg: Config, resume: bool, echo, ranks: Ranks) -> Path:
    main = ranks.main
    run_dir = check_run_dir(cfg, resume) if main else Path(cfg.output.dir)
    if not cfg.data.train:
        raise ConfigError("data.train: not set")
    loud = echo or (lambda line: print(line, flush=True))
    say = loud if main else (lambda line: None)
    cfg, checkpointing = check_fits(cfg, ranks.size)
    if checkpointing:
        say(f"note: {checkpointing}")
    if uses_cache(cfg.model):  # the one-time copy, with its progress, before loading
        if main:  # the other ranks wait for it, then load it as it is
            prepare.prepare(cfg.model, say)
        ranks.barrier()
    engine = setup(cfg, cfg.model.adapter, trainable=True) if cfg.model.adapter else setup(cfg)
    model, t = engine.model, cfg.train
    if t.method == "grpo":
        from .grpo import train_grpo

        return train_grpo(engine, run_dir, resume, say, ranks)
    if t.method != "sft":
        from .preference import train_pairs

        return train_pairs(engine, run_dir, resume, say, ranks)
    sharded = ranks.size > 1 and (cfg.lora.method == "full" or t.shard)
    if sharded:  # FSDP gathers a unit's weights in its forward: the loss takes whole logits
        engine.split = None
    train_data = engine.dataset(cfg.data.train)
    valid_data = engine.dataset(cfg.data.valid) if cfg.data.valid else None
    for name, data in (("train", train_data), ("valid", valid_data)):
        if data is not None:
            say(data.stats.line(name, cfg.data.max_seq_len))
    if ranks.size > 1:
        check_fingerprints(ranks.gather_object(fingerprint(train_data.examples,
                                                           engine.loaded.path)))  # fmt: skip
    if main and not resume:
        with atomic_folder(run_dir, replace=True) as tmp:
            (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    batching = Batching.of(cfg, ranks.size)
    stream = Stream(train_data, batching, t.seed)
    total = total_steps(t, len(stream.plan(0)))
    params = list(lora.trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    lr_at = schedule(t, total)
    layout = {"ranks": ranks.size, "batching": list(batching.key())}
    state = checkpoint.RunState(layout=layout)
    if resume:
        state = _resume(run_dir, model, optimizer, batching, ranks, say)
        say(f"resuming {run_dir} at step {state.step}/{total}")
        if state.step >= total:
            say(f"nothing to do: the run is at step {state.step}; raise train.iters to go on")
        state = replace(state, layout=layout)
    elif ranks.size > 1:  # the same start on every rank, whatever its RNG gave
        ranks.broadcast(params)
    if sharded:
        optimizer = shard.wrap(model, optimizer)
        params = list(lora.trainable(model).values())
        first = min(range(len(train_data.examples)), key=lambda i: len(train_data.examples[i]))
        idle = collate(train_data.examples, [[first]], batching.max_seq_len)
    split = f", {ranks.size} data-parallel ranks" if ranks.size > 1 else ""
    if sharded:
        held = sum(shard.local(p).numel() for p in model.parameters())
        total_params = sum(p.numel() for p in model.parameters())
        split += f" (FSDP2: each holds {held:,} of the {total_params:,} parameters)"
    say(f"training {lora.count(lora.trainable(model)):,} parameters ({cfg.lora.method}, "
        f"{len(engine.adapted)} modules) on {engine.loaded.device}, {total} steps{split}"
        + ("" if engine.split else "; loss on full logits"))  # fmt: skip
    reporter = Reporter(run_dir / METRICS, total, say, write=main)
    offload = (
        t.offload_checkpoints and t.grad_checkpoint is True and engine.loaded.device.type == "cuda"
    )
    width, arena = model.config.get_text_config().hidden_size, assemble.HostArena(pin=offload)
    for store in engine.loaded.stores if offload else ():
        store.arena = arena
    model.train()
    _reset_peak(engine)
    window, position, step = new_window(state.window), state.position, state.step
    while step < total:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = t.learning_rate * lr_at(step - 1)
        step_tokens = 0
        for _ in range(t.grad_accum):
            share, position = _share(stream, position, ranks)
            if share.batch is not None:  # else: no row for this rank, it adds nothing
                arena.reset()  # the previous micro-batch's backward is done
                with layer_inputs_on_host(arena, width) if offload else contextlib.nullcontext():
                    loss = batch_loss(engine, *device_arrays(engine, share.batch,
                                                             GATHER_MULTIPLE))  # fmt: skip
                loss.backward()
                window["loss"] += float(loss.detach())
            elif sharded:  # FSDP's gathers need every rank: one row that adds nothing
                zero = batch_loss(engine, *device_arrays(engine, idle, GATHER_MULTIPLE)) * 0.0
                zero.backward()
            step_tokens += share.loss_tokens
            window["real"] += share.real_tokens
            window["slots"] += share.slots
        # The step's loss is the mean over all its target tokens: each rank's sum of token
        # gradients over its shares, summed over ranks, divided by the global count.
        if ranks.size > 1 and not sharded:
            ranks.gradients(params, 1.0 / max(step_tokens, 1))
        else:  # one process, or FSDP's reduce-scatter has summed this rank's shard
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / max(step_tokens, 1))
        norm = shard.full(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window["tokens"] += step_tokens
        window["steps"] += 1
        if step % t.report_every == 0 or step == total:
            loss_sum = ranks.sum(window["loss"])
            peak = ranks.max(_peak_gb(engine))
            elapsed = time.perf_counter() - window["t0"]
            reporter.train(step, loss_sum / window["tokens"], optimizer.param_groups[0]["lr"],
                           window["real"] / elapsed, window["real"] / window["slots"],
                           peak, elapsed / window["steps"],
                           grad_norm=round(float(norm), 4), loss_tokens=window["tokens"],
                           real_tokens=window["real"], elapsed_s=round(elapsed, 4))  # fmt: skip
            window = new_window()
        if valid_data is not None and (
            step == total or (t.eval_every and step % t.eval_every == 0)
        ):
            r = evaluate(engine, valid_data, t.eval_batches, ranks)
            reporter.valid(step, r["loss"], r["perplexity"], r["tokens"])
        if step == total or (t.save_every and step % t.save_every == 0):
            state = checkpoint.RunState(step, position, saved_window(window), layout)
            if ranks.size > 1:  # a checkpoint holds the window's loss summed over ranks
                state.window["loss"] = ranks.sum(state.window["loss"])
            if main or sharded:  # sharded: every rank sends its shards
                weights, moments = checkpoint.tensors(model, optimizer)
            if main:
                checkpoint.save(run_dir, state, weights, moments,
                                partial(engine.write_adapter, weights=weights),
                                cfg.output.keep_checkpoints)  # fmt: skip
    weights = checkpoint.tensors(model)[0] if main or sharded else None
    if main:
        write_final(run_dir, partial(engine.write_adapter, weights=weights))
    say(f"done: {run_dir}")
    return run_dir


def _resume(run_dir: Path, model: nn.Module, optimizer, batching: Batching, ranks: Ranks, say):
    """Rank 0 restores the newest checkpoint and hands it to every rank (parameters, AdamW's
    moments and steps, the RNG state, the run state); a run resumed on another number of ranks
    must plan the same global batches (distributed.check_resume)."""
    restore = partial(checkpoint.restore, model=model, optimizer=optimizer)
    answer = checkpoint_to_all(
        ranks,
        run_dir,
        restore,
        batching,
        ranks.broadcast_object,
        lambda: {"moments": _moment_shapes(optimizer)},
    )
    if ranks.size > 1:
        params = list(lora.trainable(model).values())
        moments = []
        for i, slot, shape, dtype, on_cpu in answer["moments"]:
            p = params[i]
            if not ranks.main:  # AdamW's state as rank 0 has it, to be filled in
                optimizer.state.setdefault(p, {})[slot] = torch.zeros(
                    shape, dtype=getattr(torch, dtype), device="cpu" if on_cpu else p.device
                )
            moments.append(optimizer.state[p][slot])
        rng = torch.get_rng_state()
        ranks.broadcast([*params, *moments, rng])
        torch.set_rng_state(rng)
        if torch.cuda.is_available():  # this rank's GPU draws as rank 0's did
            cuda_rng = torch.cuda.get_rng_state()
            ranks.broadcast([cuda_rng])
            torch.cuda.set_rng_state(cuda_rng)
    return resumed_state(ranks, run_dir, answer, say)


def _moment_shapes(optimizer) -> list:
    """AdamW's state, described for ranks that have none yet: (parameter index, slot, shape,
    dtype, on the CPU) of each tensor, in order."""
    out = []
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for slot, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out.append((i, slot, tuple(value.shape), str(value.dtype).removeprefix("torch."),
                            value.device.type == "cpu"))  # fmt: skip
    return out


def layer_inputs_on_host(arena, width: int, device_type: str = "cuda", seen: list | None = None):
    """Saved tensors hooks that move the checkpointed layers' inputs to pinned host memory
    until backward, and nothing else.

    Inside a checkpointed layer, the checkpoint's own hooks are innermost and keep nothing; so
    what reaches these hooks is what autograd saves outside the layers: each layer's input
    [B, L, width] (and the final norm's), which goes to the host, and the frozen weights and
    loss chunks that the head and the loss save, which stay where they are (offloading the
    2 GB head for every loss chunk would cost two PCIe crossings per chunk). `seen` records
    the shapes moved (tests). They go into `arena` (an `assemble.HostArena`)."""

    def pack(t: torch.Tensor):
        if (t.device.type != device_type or t.dim() != 3 or t.shape[-1] != width
                or isinstance(t, nn.Parameter)):  # fmt: skip
            return t
        if seen is not None:
            seen.append(tuple(t.shape))
        host = arena.take(t.shape, t.dtype)
        host.copy_(t, non_blocking=True)
        return (t.device, host)

    def unpack(saved):
        if isinstance(saved, tuple):
            where, host = saved
            return host.to(where, non_blocking=True)
        return saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _reset_peak(engine: Engine) -> None:
    if engine.loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def _peak_gb(engine: Engine) -> float:
    """Peak device memory (CUDA's allocator), or the process's peak resident set on the CPU
    since training started (Linux; the process's lifetime peak elsewhere)."""
    if engine.loaded.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss() / 1e9


def reset_peak_rss() -> None:
    """Linux: start the resident-set high-water mark (VmHWM) afresh."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Bytes: VmHWM on Linux, else getrusage's lifetime peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
