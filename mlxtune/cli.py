"""The `mlxtune` command line. Imports stay lazy: `mlxtune --help` loads no mlx, torch or transformers.

User errors (`MlxtuneError`) print one line, `mlxtune: error: ...`, and exit 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import click

from . import __version__
from .data.convert import FORMATS  # stdlib only, like everything imported here
from .errors import DataError, MlxtuneError

_ARGV: list[str] | None = None  # set by main(); None when driven in-process (tests, notebooks)


class _UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        from .distributed import world_from_env

        click.echo(f"mlxtune: error{world_from_env().tag()}: {self.message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlxtuneError as e:
            raise _UserError(str(e)) from None


FUSION_MODES = ("best-of", "merge", "debate", "self")


def mlx_command(fn: Callable) -> Callable:
    """For commands that run MLX: on Linux, re-exec with OpenBLAS or print how to get it."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        if _ARGV is not None:
            from .env import use_fast_blas

            hint = use_fast_blas(_ARGV)
            if hint:
                click.echo(hint, err=True)
        return fn(*args, **kwargs)

    return wrapper


def _engine(cfg):
    """The trainer module of the configured backend: MLX, or the PyTorch twin."""
    from .api import engine_of

    return engine_of(cfg)


def _load(config_path: str | None, overrides: tuple[str, ...]):
    from .config import load_config

    return load_config(config_path, overrides)


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set lora.rank=16 (repeatable).",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxtune")
def cli() -> None:
    """LoRA fine-tuning on Apple Silicon (MLX), with a CUDA twin and a multi-model fusion client."""


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@set_option
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    help="Continue the run in RUN_DIR from its newest checkpoint (its config.yaml, plus --set).",
)
@click.option("--hosts", metavar="H1,H2,...",
              help="Train data-parallel on these Macs (mlx.launch, ring backend): names or IPs, "
                   "localhost for this one; each needs the same paths and passwordless ssh. "
                   "train.batch_tokens is per host.")  # fmt: skip
@click.option("--hostfile", type=click.Path(dir_okay=False),
              help="An mlx.launch hostfile (JSON: hosts, IPs, backend such as jaccl) instead of "
                   "--hosts.")  # fmt: skip
@click.option("--gpus", type=click.IntRange(min=1),
              help="model.backend cuda: train data-parallel on N GPUs of this machine "
                   "(torchrun). train.batch_tokens is per GPU.")  # fmt: skip
@mlx_command
def train(config, overrides, resume, hosts, hostfile, gpus):
    """Fine-tune the model described by CONFIG (YAML), or resume a run with --resume RUN_DIR.
    Under mlx.launch or torchrun, each process trains its share of every batch."""
    if resume and config:
        raise MlxtuneError("give CONFIG or --resume RUN_DIR, not both")
    if resume:
        cfg = _load(str(Path(resume) / "config.yaml"), (*overrides, f"output.dir={resume}"))
    elif config:
        cfg = _load(config, overrides)
    else:
        raise MlxtuneError("CONFIG is required (or --resume RUN_DIR)")
    if hosts or hostfile or gpus:
        argv = ["train", *([config] if config else []), *(a for o in overrides for a in ("--set", o)),
                *(["--resume", resume] if resume else [])]  # fmt: skip
        sys.exit(_launch(cfg, argv, hosts, hostfile, gpus))
    _engine(cfg).train(cfg, resume=bool(resume), echo=click.echo)


def _launch(cfg, argv: list[str], hosts, hostfile, gpus) -> int:
    """Start `mlxtune <argv>` on every rank: mlx.launch for Macs, torchrun for GPUs."""
    import subprocess
    import tempfile

    from . import distributed

    if (hosts or hostfile) and gpus:
        raise MlxtuneError("give --hosts/--hostfile (Macs, MLX) or --gpus (cuda), not both")
    if gpus:
        if cfg.model.backend != "cuda":
            raise MlxtuneError("--gpus: needs model.backend cuda; Macs train on several hosts "
                               "with --hosts")  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={gpus}", "-m", "mlxtune", *argv]  # fmt: skip
        click.echo("launching: " + " ".join(cmd))
        return subprocess.call(cmd)
    if cfg.model.backend == "cuda":
        raise MlxtuneError("--hosts: the cuda backend trains on several GPUs with --gpus (one "
                           "machine); on several machines, run torchrun with --nnodes yourself")  # fmt: skip
    if not hostfile and distributed.all_local(hosts):
        return distributed.run_local(argv, distributed.all_local(hosts), click.echo)
    with tempfile.TemporaryDirectory() as tmp:
        if not hostfile:
            hostfile = str(Path(tmp) / "hosts.json")
            Path(hostfile).write_text(json.dumps(distributed.hostfile_for(hosts)), "utf-8")
        return distributed.run_launch(distributed.launch_command(argv, hostfile), click.echo)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--verify", is_flag=True, help="Also re-hash every file of a finished copy.")
def prepare(config, overrides, verify):
    """Write the prepared copy of CONFIG's model for the cuda backend (NF4 weights, each MoE
    layer's experts in one block), shard by shard, never holding the model whole. Resumes after
    a kill; `train` runs it itself when the copy is missing."""
    from .plan.cuda import uses_cache

    cfg = _load(config, overrides)
    if not uses_cache(cfg.model):
        click.echo("nothing to prepare: only model.backend cuda with model.quantize 4 or "
                   "model.offload_experts loads through a prepared copy")  # fmt: skip
        return
    _engine(cfg)  # torch and transformers present, or one line saying how to get them
    from cuda_backend.prepare import prepare as write

    started = time.perf_counter()
    folder = write(cfg.model, echo=lambda line: click.echo(line, err=True), verify_files=verify)
    checked = "; every file's checksum verified" if verify else ""
    click.echo(f"{folder} ({time.perf_counter() - started:.0f} s){checked}")


@cli.command(name="eval")
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--adapter", type=click.Path(file_okay=False), help="Run folder with an adapter.")
@click.option(
    "--data",
    "data_file",
    type=click.Path(dir_okay=False),
    help="JSONL to score; default data.valid.",
)
@click.option(
    "--max-rows", default=200, show_default=True, help="Rows answered for exact match; 0 skips it."
)
@mlx_command
def eval_(config, overrides, adapter, data_file, max_rows):
    """Loss, perplexity and exact-match accuracy of CONFIG's model on a data file, as JSON."""
    from .api import evaluate

    result = evaluate(_load(config, overrides), data_file, adapter=adapter, max_rows=max_rows)
    click.echo(json.dumps(result, indent=2))


@cli.command()
@click.option("--model", required=True, help="Model folder or Hugging Face repo id.")
@click.option("--adapter", type=click.Path(file_okay=False), help="Run folder with an adapter.")
@click.option("--prompt", required=True, help="User message.")
@click.option(
    "--image", multiple=True, type=click.Path(dir_okay=False), help="Image file (repeatable)."
)
@click.option(
    "--audio", multiple=True, type=click.Path(dir_okay=False), help="Audio file (repeatable)."
)
@click.option("--max-tokens", default=256, show_default=True, help="Tokens to generate.")
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@mlx_command
def generate(model, adapter, prompt, image, audio, max_tokens, temp):
    """Stream a reply from MODEL (optionally with an adapter, images and audio clips)."""
    from .api import load

    for piece in load(model, adapter).stream(prompt, images=image, audio=audio,
                                             max_tokens=max_tokens, temp=temp):  # fmt: skip
        click.echo(piece, nl=False)
    click.echo()


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", default="peft", show_default=True,
              type=click.Choice(["peft", "mlx-lm", "merged", "gguf", "gguf-lora"]),
              help="PEFT adapter, mlx-lm adapter, a merged HF model folder, a merged GGUF file, "
                   "or the base's GGUF and the adapter's (llama.cpp LoRA); GGUF comes with an "
                   "Ollama Modelfile.")  # fmt: skip
@click.option("--quant", type=click.Choice(["f32", "f16", "q8_0", "q4_k_m"]), default="f16",
              show_default=True, help="gguf, gguf-lora: the model weights' type.")  # fmt: skip
@click.option(
    "--push-to-hub",
    "repo",
    metavar="REPO",
    help="Upload the export with a model card to this Hugging Face repo (user/name).",
)
@click.option("--private", is_flag=True, help="--push-to-hub: make the repo private.")
@mlx_command
def export(run_dir, out, fmt, quant, repo, private):
    """Export RUN_DIR's adapter as PEFT, mlx-lm, a merged Hugging Face model folder, or GGUF."""
    from .export import export as run

    folder = run(run_dir, out, fmt, quant, repo, private)
    click.echo(f"wrote {folder} ({fmt})" + (f"; pushed to {repo}" if repo else ""))
    if fmt.startswith("gguf"):
        model = next(p for p in folder.glob("*.gguf") if not p.stem.endswith("-lora"))
        lora = next((f" --lora {p}" for p in folder.glob("*-lora.gguf")), "")
        name = Path(run_dir).resolve().name.lower()
        for line in (folder / "Modelfile").read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):  # what the file leaves out
                click.echo(f"note: {line[2:]}")
        click.echo(f"run it: ollama create {name} -f {folder / 'Modelfile'} && ollama run {name}"
                   f"\n    or: llama-cli -m {model}{lora} -cnv")  # fmt: skip


@cli.group(cls=_Group)
def data():
    """Dataset tools: validate, stats, convert, split."""


def _data_options(fn: Callable) -> Callable:
    fn = set_option(fn)
    fn = click.option("--model", "model_path", default=None,
                      help="Model folder or hub id whose tokenizer and media plan count tokens "
                           "(default: model.path of the config).")(fn)  # fmt: skip
    fn = click.option("-c", "--config", "config", default=None,
                      type=click.Path(dir_okay=False),
                      help="Config for model.path and data.* (max_seq_len, loss_on, ...).")(fn)  # fmt: skip
    return click.argument("file", type=click.Path(dir_okay=False))(fn)


def _data_check(file, config, overrides, model_path):
    from .data import check

    extra = (f"model.path={model_path}",) if model_path else ()
    cfg = _load(config, (*overrides, *extra))
    model = check.tokenizing(cfg)
    started = time.perf_counter()

    def progress(rows: int) -> None:  # on stderr, so stdout stays the report
        pace = rows / max(time.perf_counter() - started, 1e-9)
        click.echo(f"{rows:,} rows checked, {pace:,.0f} rows/s", err=True)

    return check, cfg, model, check.check(file, cfg, model, progress)


@data.command()
@_data_options
def validate(file, config, overrides, model_path):
    """Check every row of FILE: schema, roles, pictures and clips (decoded), and with a model
    the token length against data.max_seq_len. A summary, then one line per problem; exits 1
    when there is any."""
    check, cfg, model, report = _data_check(file, config, overrides, model_path)
    click.echo(check.summary(report))
    if model is None:
        click.echo("token lengths not checked: give --model PATH (or model.path in -c CONFIG)")
    for line in report.problems:
        click.echo(line)
    if report.problems:
        sys.exit(1)


@data.command()
@_data_options
def stats(file, config, overrides, model_path):
    """Rows, modalities, token length percentiles and a histogram, and how packing would fill
    rows (with a model)."""
    check, cfg, model, report = _data_check(file, config, overrides, model_path)
    if not report.rows:
        raise DataError(f"{file}: no valid rows (mlxtune data validate {file} lists the problems)")
    for line in check.stats_lines(report, cfg, model):
        click.echo(line)


@data.command()
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option(
    "--from",
    "from_format",
    type=click.Choice(FORMATS),
    help="Read SRC in this format, write mlxtune JSONL.",
)
@click.option(
    "--to",
    "to_format",
    type=click.Choice(FORMATS),
    help="Read mlxtune JSONL, write DST in this format (.jsonl: one record a line; "
    "otherwise one JSON array).",
)
@click.option(
    "--prompt",
    help="csv: the user instruction of image_path,caption and audio_path,text rows "
    "(defaults: 'Describe this image.', 'Please transcribe this audio.').",
)
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
def convert(src, dst, from_format, to_format, prompt, force):
    """Convert alpaca, sharegpt or csv to mlxtune JSONL (--from), or back (--to).

    Relative media paths are rewritten to name the same files from DST's folder."""
    from .data.convert import convert as run

    click.echo(run(src, dst, from_format=from_format, to_format=to_format, prompt=prompt,
                   force=force))  # fmt: skip


@data.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--valid",
    default="0.05",
    show_default=True,
    help="Validation rows: a share in (0, 1) or a count >= 1.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the shuffle.")
@click.option("--force", is_flag=True, help="Overwrite existing train/valid files.")
def split(file, valid, seed, force):
    """Shuffle FILE and write <stem>.train.jsonl and <stem>.valid.jsonl beside it."""
    from .data.convert import split as run

    click.echo(run(file, valid, seed, force))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False),
              help="Image to write (.png, .svg or .pdf); default RUN_DIR/loss.png.")  # fmt: skip
def plot(run_dir, out):
    """Draw RUN_DIR's train and validation loss, learning rate and tokens/s against step
    (from its metrics.jsonl) into RUN_DIR/loss.png. Needs matplotlib: pip install 'mlxtune[plot]'."""
    from .plot import plot_run

    click.echo(f"wrote {plot_run(run_dir, out)}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--vram-gb", type=float, default=None,
              help="GPU memory (cuda) or unified memory (mlx); default 24 for cuda, this machine's "
                   "memory for mlx.")  # fmt: skip
@click.option("--ram-gb", type=float, default=None, help="Host RAM (cuda); default this machine's.")
@click.option("--pcie-gbps", type=float, default=None,
              help="Host-to-GPU bandwidth for the time per step (cuda); default 25, PCIe 4.0 x16.")  # fmt: skip
@click.option("--hosts", "hosts", metavar="N|H1,H2,...",
              help="Plan data-parallel training on N Macs (a count, or the hosts' names).")  # fmt: skip
@click.option("--gpus", type=click.IntRange(min=1), help="Plan data-parallel training on N GPUs.")
@click.option("--link-gbps", type=float, default=None,
              help="Bandwidth between ranks for the all-reduce; default 1.25 (10 Gb Ethernet) "
                   "between Macs, --pcie-gbps between GPUs.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(config, overrides, vram_gb, ram_gb, pcie_gbps, hosts, gpus, link_gbps, as_json):
    """Memory plan for CONFIG before anything loads: bytes per component on the GPU (or unified
    memory) and in host RAM while training, the peaks while preparing and loading, the disk
    for the prepared copy, the bytes streamed per step and their time. Exits 1 if it does not
    fit."""
    from . import env
    from . import plan as planner

    cfg = _load(config, overrides)
    total, _ = env.memory_bytes()
    machine = total / 2**30 if total else None
    if vram_gb is None:
        vram_gb = 24.0 if cfg.model.backend == "cuda" else machine
    extra = {"pcie_gbps": pcie_gbps} if pcie_gbps else {}
    ranks = gpus or 1
    if hosts:
        ranks = int(hosts) if hosts.isdigit() else len([h for h in hosts.split(",") if h.strip()])
    p = planner.plan(cfg, vram_gb, ram_gb if ram_gb is not None else machine, **extra,
                     ranks=ranks, link_gbps=link_gbps)  # fmt: skip
    if as_json:
        rows = [{"name": r.name, "gpu_bytes": r.gpu, "host_bytes": r.host, "note": r.note}
                for r in p.rows]  # fmt: skip
        phases = {k: {"gpu_bytes": g, "host_bytes": h} for k, (g, h) in p.phases.items()}
        click.echo(json.dumps({"model": p.model, "backend": p.backend, "params": vars(p.counts),
                               "tokens_per_step": p.tokens, "rows": rows, "gpu_bytes": p.gpu,
                               "host_bytes": p.host, "phases": phases, "disk_bytes": p.disk,
                               "streamed_bytes_per_step": p.streamed_per_step,
                               "seconds_per_step_streaming": p.step_seconds,
                               "ranks": p.ranks, "allreduce_seconds": p.allreduce_seconds,
                               "verdict": p.verdict()}, indent=2))  # fmt: skip
    else:
        click.echo(p.table())
        click.echo(p.verdict())
    sys.exit(0 if p.fits else 1)


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the tiny model, the data and the run.")  # fmt: skip
@click.option("--task", type=click.Choice(["media", "media-3n", "text"]), default="media",
              show_default=True,
              help="media: a tiny Gemma 4 learns colours of pictures and pitches of tones; "
                   "media-3n: the same on a tiny Gemma 3n (longer tones, 240 steps: ~8 minutes "
                   "on a 2-core CPU); text: a tiny Llama learns word groups.")  # fmt: skip
@mlx_command
def demo(out, task):
    """Make a tiny model, fine-tune it for a minute or two, and show it learned."""
    from .demo import run

    run(Path(out), click.echo, task)


@cli.group(cls=_Group)
def fusion():
    """Run one prompt through a pool of LLMs and have a judge produce one answer."""


@fusion.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("prompt")
@set_option
@click.option("--mode", type=click.Choice(FUSION_MODES), help="Override fusion.mode.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def ask(config, prompt, overrides, mode, as_json):
    """Ask the pool in CONFIG one question: the answer streams, then the member table."""
    import asyncio

    from fusion.client import FusionClient

    cfg = _load(config, overrides)

    async def go():
        async with FusionClient(cfg) as client:
            show = None if as_json else (lambda piece: click.echo(piece, nl=False))
            return await client.run([{"role": "user", "content": prompt}], mode, show)

    result = asyncio.run(go())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo("\n")
        click.echo(result.table())


@fusion.command()
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8400, show_default=True, help="Port to listen on.")
@click.option("--insecure-no-token", is_flag=True,
              help="Allow a --host beyond loopback without fusion.server_token_env: anyone who "
                   "can reach the port spends the pool's API keys.")  # fmt: skip
def serve(config, overrides, host, port, insecure_no_token):
    """Serve the pool in CONFIG as an OpenAI-compatible endpoint (/v1/chat/completions)."""
    from aiohttp import web

    from fusion.server import check_bind, check_not_self, make_app, model_ids

    cfg = _load(config, overrides)
    warning = check_bind(cfg, host, insecure_no_token)
    check_not_self(cfg, host, port)
    app = make_app(cfg)
    if warning:
        click.echo(warning, err=True)
    click.echo(f"fusion serving http://{host}:{port}/v1 (models: {', '.join(model_ids(cfg))})")
    web.run_app(app, host=host, port=port, print=None)


@fusion.command(name="eval")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("tasks", type=click.Path(dir_okay=False))
@set_option
@click.option("--modes", default=",".join(FUSION_MODES), show_default=True,
              help="Comma-separated modes to score.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_fusion(config, tasks, overrides, modes, as_json):
    """Accuracy of each member, oracle@n, majority vote and each mode on TASKS.jsonl (rows with
    a gold "answer"), with judge regret, cost multiple and latency overhead."""
    import asyncio

    from fusion import eval as fusion_eval

    cfg = _load(config, overrides)
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in FUSION_MODES]
    if unknown:
        raise MlxtuneError(f"--modes: {unknown[0]!r} is not one of {', '.join(FUSION_MODES)}")
    rows = fusion_eval.read_tasks(tasks)
    echo = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    report = asyncio.run(fusion_eval.evaluate(cfg, rows, chosen, echo))
    click.echo(json.dumps(report, indent=2) if as_json else fusion_eval.table(report))


@cli.command(name="config")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@set_option
@click.option("--keys", is_flag=True, help="List every key with its type, default and help.")
def config_(config, overrides, keys):
    """Print the resolved CONFIG (defaults < file < --set), or every key with --keys."""
    from .config import describe_keys

    if keys:
        for key, type_name, default, help_text in describe_keys():
            click.echo(f"{key:<24} {type_name:<36} default {default!r:<14} {help_text}")
        return
    click.echo(_load(config, overrides).to_yaml(), nl=False)


@cli.command()
@click.option("--hosts", metavar="H1,H2,...",
              help="Check these Macs for training together (as train --hosts): same mlxtune, "
                   "MLX and Python, the same model and data files (with --config), and an "
                   "all-reduce over the ring.")  # fmt: skip
@click.option("--hostfile", type=click.Path(dir_okay=False), help="An mlx.launch hostfile.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="With --hosts: also compare the files of this config's model and data.")  # fmt: skip
@click.option("--fingerprint", is_flag=True, hidden=True)
@click.option("--probe", is_flag=True, hidden=True)
@mlx_command
def doctor(hosts, hostfile, config, fingerprint, probe):
    """Platform, MLX device, BLAS, memory, torch/CUDA and disk: what this machine can do.
    With --hosts: whether those machines can train together."""
    from . import distributed, env  # stdlib only (numpy's BLAS would confuse the blas row)

    if fingerprint:
        click.echo(json.dumps(distributed.host_fingerprint(config)))
        return
    if probe:
        from .ranks import probe as ring_probe

        line = ring_probe()
        if line:
            click.echo(line)
        return
    if hosts or hostfile:
        sys.exit(distributed.check_hosts(hosts, hostfile, config, click.echo))
    for label, value in _doctor_rows(env):
        click.echo(f"{label:<13} {value}")


def _doctor_rows(env) -> list[tuple[str, str]]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    total, available = env.memory_bytes()
    rows = [
        ("mlxtune", __version__),
        ("platform", f"{platform.platform()}, Python {platform.python_version()}"),
        ("memory", f"{env.gib(total)} total, {env.gib(available)} available"),
    ]
    try:
        import mlx.core as mx

        metal = mx.metal.is_available()
        a = mx.random.normal((1024, 1024))
        mx.eval(a @ a)
        start = time.perf_counter()
        for _ in range(5):
            mx.eval(a @ a)
        gflops = 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
        rows.append(("mlx", f"{ver('mlx')}, device {mx.default_device()}, Metal: {metal}"))
        if sys.platform.startswith("linux"):
            rows.append(("blas", env.blas_in_use()))
        rows.append(("matmul", f"1024x1024 fp32: {gflops:.1f} GFLOP/s"))
    except ImportError as e:
        rows.append(("mlx", f"not importable ({e})"))
    rows.append(("mlx-lm", ver("mlx-lm") or "not installed"))
    if ver("torch"):
        import torch

        cuda = torch.cuda.is_available()
        gpu = f" ({torch.cuda.get_device_name(0)})" if cuda else ""
        rows.append(("torch", f"{torch.__version__}, CUDA: {cuda}{gpu}"))
    else:
        rows.append(("torch", "not installed (needed only for model.backend: cuda)"))
    rows.append(("transformers", ver("transformers") or "not installed"))
    rows.append(("disk", f"{env.gib(env.free_disk_bytes())} free here"))
    return rows


def main(argv: list[str] | None = None) -> None:
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    cli.main(args=_ARGV, prog_name="mlxtune")
