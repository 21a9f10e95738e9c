"""Data-parallel training, the parts both backends share. Framework-free.

Every rank plans the same global micro-batches (`Batching.of(cfg, ranks)`), runs its share of
each (`Stream.share`), and the gradients are summed by the backend's collectives (MLX's
`mx.distributed`, torch's `torch.distributed`), normalised by the global count of target tokens,
so N ranks with `train.batch_tokens` B take the steps one process takes with N x B. Rank 0 alone
writes the run folder; a resumed run must plan the same global batches.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import zlib
from dataclasses import dataclass

from .errors import ConfigError, MlxtuneError

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run folder and prints progress."""
        return self.rank == 0

    def tag(self) -> str:
        return f" (rank {self.rank} of {self.size})" if self.size > 1 else ""


class OnWorld:
    """A backend's ranks: its `world`, with the rank's numbers at hand."""

    world: World

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def main(self) -> bool:
        return self.world.main


def world_from_env() -> World:
    """The rank and world size the launcher put in the environment: mlx.launch (MLX_RANK, and
    the ranks listed in MLX_HOSTFILE) or torchrun (RANK, WORLD_SIZE); one rank when neither."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]))
    if "MLX_RANK" in env:
        size = env.get("MLX_WORLD_SIZE")
        if not size:  # the ring backend lists the ranks' addresses in a JSON file
            try:
                with open(env.get("MLX_HOSTFILE", ""), encoding="utf-8") as f:
                    size = len(json.loads(f.read() or "[0]"))
            except (OSError, ValueError):
                size = 1
        return World(int(env["MLX_RANK"]), int(size))
    return World()


def lost_rank(why, run_dir) -> MlxtuneError:
    """The one line a rank stops with when another rank went away (killed, failed, unreachable):
    both backends say the same, with the way to continue."""
    return MlxtuneError(f"stopped: lost another rank ({why}); its own message, if it left one, "
                        f"is above; continue with --resume {run_dir}")  # fmt: skip


def fingerprint(examples, model_path) -> list[int]:
    """Numbers every rank must agree on before training: the examples (count and a CRC of
    their token ids and loss masks) and the model's config.json. Non-negative int32s."""
    import numpy as np  # here: the CLI imports this module, and numpy is not light

    crc = 0
    for e in examples:
        crc = zlib.crc32(np.asarray(e.ids, np.int64).tobytes(), crc)
        crc = zlib.crc32(np.asarray(e.loss, np.bool_).tobytes(), crc)
    path = os.path.join(str(model_path), "config.json")
    model = 0
    if os.path.isfile(path):
        with open(path, "rb") as f:
            model = zlib.crc32(f.read())
    return [len(examples) & 0x7FFFFFFF, crc & 0x7FFFFFFF, model & 0x7FFFFFFF]


def check_fingerprints(prints: list[list[int]]) -> None:
    """One line naming the first rank whose data or model differs from rank 0's."""
    what = ("number of training examples", "training data", "model config.json")
    for rank, theirs in enumerate(prints[1:], start=1):
        for name, a, b in zip(what, prints[0], theirs, strict=True):
            if a != b:
                raise MlxtuneError(
                    f"rank {rank} has a different {name} than rank 0; every host needs the "
                    "same model and data at the same paths (check with mlxtune doctor --hosts)"
                )


def check_resume(saved: dict, batching, ranks: int) -> None:
    """A run resumes exactly only if it plans the same global micro-batches: on another number
    of ranks that needs train.batch_tokens (and batch_size) scaled by the inverse ratio."""
    was = saved.get("ranks", 1)
    key = saved.get("batching")
    if key is None or tuple(key) == tuple(batching.key()):
        return
    tokens = key[3]
    need = ""
    if was != ranks and tokens and tokens % ranks == 0:
        need = f"; resume on {was} ranks, or --set train.batch_tokens={tokens // ranks}"
        if key[2]:
            need += f" train.batch_size={max(key[2] // ranks, 1)}"
        need += f" to plan the same {tokens}-token global batches on {ranks}"
    raise ConfigError(
        f"the run was trained on {was} rank{'s' * (was != 1)} with global micro-batches of "
        f"{tokens} tokens; this resume on {ranks} would plan {batching.tokens} and not continue "
        f"the same steps{need or '; start a new run'}"
    )


def checkpoint_to_all(ranks, run_dir, restore, batching, share, extra=dict) -> dict:
    """The first half of a resume, on either backend: rank 0 restores the newest checkpoint
    (`restore(folder) -> RunState`), checks it plans the same global batches, and `share`s
    (the backend's broadcast of a JSON-able object) its state, with `extra()`, or its error,
    with every rank, which then raises it."""
    from .runs import all_checkpoints

    answer: dict = {}
    if ranks.main:
        try:
            state = restore(all_checkpoints(run_dir)[-1])
            check_resume(state.layout, batching, ranks.size)
            answer = {"step": state.step, "epoch": state.position.epoch,
                      "index": state.position.index, "window": state.window, **extra()}  # fmt: skip
        except MlxtuneError as e:
            if ranks.size == 1:
                raise
            answer = {"error": str(e)}
    answer = share(answer)
    if "error" in answer:
        raise MlxtuneError(answer["error"])
    return answer


def resumed_state(ranks, run_dir, answer: dict, say):
    """The second half: rank 0 tidies the run folder; every rank gets its RunState (the saved
    report window's loss is the ranks' sum, so rank 0 alone carries it)."""
    from pathlib import Path

    from .data.batching import Position
    from .progress import METRICS, truncate_metrics
    from .runs import RunState, clean_stale

    if ranks.main:
        truncate_metrics(Path(run_dir) / METRICS, answer["step"])
        for stale in clean_stale(run_dir):
            say(f"removed {stale.name}: left half-written by the stopped run")
    window = answer["window"] if ranks.main else {**answer["window"], "loss": 0.0}
    return RunState(answer["step"], Position(answer["epoch"], answer["index"]), window)


def hostfile_for(hosts: str) -> dict:
    """An mlx.launch hostfile for `--hosts mac1,mac2`: the ring backend needs each host's IP,
    so names are resolved here (ssh still uses the name); localhost runs without ssh."""
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if not names:
        raise ConfigError("--hosts: give the hosts, e.g. --hosts mac1.local,mac2.local")
    out = []
    for name in names:
        if name in LOCAL_HOSTS:
            out.append({"ssh": "127.0.0.1", "ips": ["127.0.0.1"]})
            continue
        try:
            ip = socket.gethostbyname(name)
        except OSError as e:
            raise ConfigError(f"--hosts: cannot resolve {name} ({e})") from None
        out.append({"ssh": name, "ips": [ip]})
    return {"hosts": out}


def launch_command(argv: list[str], hostfile: str, backend: str | None = None) -> list[str]:
    """The `mlx.launch` command that runs `mlxtune <argv>` on every host of `hostfile`, with
    this Python and this working directory (every host needs the same paths)."""
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    cmd = [launcher if os.path.exists(launcher) else "mlx.launch", "--hostfile", hostfile]
    cmd += ["--backend", backend] if backend else []
    cmd += ["--cwd", os.getcwd(), "--python", sys.executable]
    return [*cmd, "--", "-m", "mlxtune", *argv]


def run_launch(cmd: list[str], echo) -> int:
    """Run an mlx.launch command, passing its output through, and end with one line naming the
    rank that failed. mlx.launch stops the other ranks when one fails but exits 0 itself (it
    only warns), so its warnings and the ranks' `error` lines decide the exit code here."""
    echo("launching: " + " ".join(shlex.quote(c) for c in cmd))
    watch = _Watch(echo)
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as p:  # fmt: skip
        assert p.stdout is not None
        for line in p.stdout:
            line = line.rstrip("\n")
            warned = re.search(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)", line)
            if warned is None:
                watch.line(line)
            elif warned.group(3) is not None:
                watch.exited(int(warned.group(1)), int(warned.group(3)))
    return watch.verdict("mlx.launch stopped the others") or p.returncode


def run_local(argv: list[str], ranks: int, echo) -> int:
    """`mlxtune <argv>` as `ranks` ranks on this machine, over the ring backend on 127.0.0.1,
    with the environment mlx.launch gives local ranks (MLX_RANK, MLX_HOSTFILE listing each
    rank's address). Started here rather than by mlx.launch because its output loop polls the
    ranks' stdin and spins on a core the whole run, which local ranks need. When a rank fails,
    the others get SIGTERM (and stop with one line), as under mlx.launch."""
    import queue
    import tempfile
    import threading

    ports = []
    for _ in range(ranks):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    watch = _Watch(echo)
    lines: queue.Queue = queue.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        ring = os.path.join(tmp, "ring.json")
        with open(ring, "w", encoding="utf-8") as f:
            json.dump([[f"127.0.0.1:{port}"] for port in ports], f)
        echo(f"launching {ranks} ranks on this machine (ring backend, ports "
             f"{', '.join(map(str, ports))})")  # fmt: skip
        procs = []
        for rank in range(ranks):
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": ring}
            procs.append(subprocess.Popen([sys.executable, "-m", "mlxtune", *argv], env=env,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1))  # fmt: skip

        def pump(rank: int, stream) -> None:
            for line in stream:
                lines.put((rank, line.rstrip("\n")))
            lines.put((rank, None))

        for rank, proc in enumerate(procs):
            threading.Thread(target=pump, args=(rank, proc.stdout), daemon=True).start()
        running = ranks

        def stop(signum, frame):  # killed itself: take the ranks down too (the finally below)
            raise SystemExit(128 + signum)

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
        try:
            while running:
                rank, line = lines.get()
                if line is not None:
                    watch.line(line)
                    continue
                running -= 1
                code = procs[rank].wait()
                if code:
                    watch.exited(rank, code)
                    for other in procs:
                        if other.poll() is None:
                            other.terminate()
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    return watch.verdict("the others were stopped")


class _Watch:
    """The ranks' output, passed through, and what it says about how they ended."""

    def __init__(self, echo) -> None:
        self.echo, self.failed, self.errors = echo, [], 0

    def line(self, line: str) -> None:
        self.echo(line)
        self.errors += line.startswith("mlxtune: error") and "lost another rank" not in line

    def exited(self, rank: int, code: int) -> None:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        self.failed.append(f"rank {rank} {how}")

    def verdict(self, stopped: str) -> int:
        """1 when a rank failed; a closing line when none said why itself."""
        if self.failed and not self.errors:
            self.echo(f"mlxtune: error: {self.failed[0]}, and {stopped}")
        return 1 if self.failed or self.errors else 0


def all_local(hosts: str | None) -> int:
    """How many ranks `--hosts` asks for when every one is this machine; 0 otherwise."""
    names = [h.strip() for h in (hosts or "").split(",") if h.strip()]
    return len(names) if names and all(n in LOCAL_HOSTS for n in names) else 0


def host_fingerprint(config: str | None) -> dict:
    """What must match on every host: versions, and (with a config) its model's small files,
    the names and sizes of its weight files, and its data files."""
    import hashlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "missing"

    out = {"mlxtune": ver("mlxtune"), "mlx": ver("mlx"), "python": platform.python_version()}
    if config is None:
        return out
    from pathlib import Path

    from .config import load_config

    cfg = load_config(config, ())
    files: dict[str, str] = {}
    model = Path(cfg.model.path)
    paths = [model / n for n in ("config.json", "tokenizer.json", "tokenizer_config.json")]
    paths += [Path(p) for p in (cfg.data.train, cfg.data.valid) if p]
    for path in paths:
        if path.is_file():
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        elif path.parent == model and path.name != "config.json":
            continue
        else:
            files[str(path)] = "missing"
    for path in sorted(model.glob("*.safetensors")) if model.is_dir() else ():
        files[str(path)] = f"{path.stat().st_size} bytes"
    out["files"] = files
    return out


def check_hosts(hosts: str | None, hostfile: str | None, config: str | None, echo) -> int:
    """`mlxtune doctor --hosts`: each host's fingerprint against the first's, then a timed
    all-reduce over the same launch `train --hosts` uses. 0 when they can train together."""
    import tempfile
    from pathlib import Path

    if hostfile:
        with open(hostfile, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["hosts"] if isinstance(data, dict) else data
    else:
        data = hostfile_for(hosts or "")
        entries = data["hosts"]
    args = ["doctor", "--fingerprint", *(["--config", os.path.abspath(config)] if config else [])]
    prints, problems = [], 0
    for i, host in enumerate(entries):
        name = host["ssh"]
        cmd = [sys.executable, "-m", "mlxtune", *args]
        if name not in LOCAL_HOSTS:
            remote = f"cd {shlex.quote(os.getcwd())} && " + " ".join(map(shlex.quote, cmd))
            cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", name, remote]
        try:
            got = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            theirs = (
                json.loads(got.stdout.strip().splitlines()[-1]) if got.returncode == 0 else None
            )
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
            got, theirs = None, None
            reason = str(e)
        if theirs is None:
            reason = (got.stderr.strip().splitlines() or ["no output"])[-1] if got else reason
            echo(f"host {i} {name}: unreachable or mlxtune missing ({reason})")
            problems += 1
            prints.append(None)
            continue
        prints.append(theirs)
        first = prints[0]
        diff = [] if first is None else _differences(first, theirs)
        echo(f"host {i} {name}: " + ("; ".join(diff) if diff else
             f"ok (mlxtune {theirs['mlxtune']}, mlx {theirs['mlx']}, Python {theirs['python']}"
             + (f", {len(theirs.get('files', {}))} files match" if config else "") + ")"))  # fmt: skip
        problems += bool(diff)
    if problems:
        echo(f"not ready: {problems} host(s) differ or cannot be reached")
        return 1
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        if all_local(hosts):
            code = run_local(["doctor", "--probe"], all_local(hosts), lines.append)
        else:
            if not hostfile:
                hostfile = str(Path(tmp) / "hosts.json")
                Path(hostfile).write_text(json.dumps(data), "utf-8")
            code = run_launch(launch_command(["doctor", "--probe"], hostfile), lines.append)
    for line in lines[1:]:
        echo(line)
    if code:
        echo("not ready: the ranks could not all-reduce (check the IPs, firewall and ports)")
        return 1
    echo(f"ready: {len(entries)} hosts can train together (mlxtune train CONFIG --hosts ...)")
    return 0


def _differences(first: dict, theirs: dict) -> list[str]:
    out = []
    for key in ("mlxtune", "mlx", "python"):
        if first[key] != theirs[key]:
            out.append(f"{key} {theirs[key]} (host 0 has {first[key]})")
    mine, other = first.get("files", {}), theirs.get("files", {})
    for path in sorted(set(mine) | set(other)):
        if mine.get(path) != other.get(path):
            out.append(
                f"{path}: {other.get(path, 'missing')} (host 0: {mine.get(path, 'missing')})"
            )
    return out
