"""The Python API: load a model and ask it, train it, evaluate it, export what a run made.

    import mlxtune as mt

    model = mt.load("google/gemma-4-E2B-it")            # a Hugging Face id or a local folder
    print(model.generate("Describe this.", images=["cat.jpg"], audio=["note.wav"]))
    for piece in model.stream("Tell me a story"):
        print(piece, end="")
    run = mt.train(model="google/gemma-4-E2B-it", data="data/", lora={"rank": 16},
                   train={"epochs": 2})                   # or mt.train("configs/x.yaml", ...)
    run.plot(); run.metrics; run.export("out", format="merged")
    print(mt.evaluate(run, "data/valid.jsonl"))

Keyword sections (`lora={...}`, `train={...}`, ...) are the YAML config's sections and are
checked by the same schema: an unknown key, a wrong type or a bad value raises
`mlxtune.errors.ConfigError` with one line naming the key (and a "did you mean"). Data may be
a JSONL file, a folder with train.jsonl (and valid.jsonl), a list of rows (dicts in any format
`mlxtune data validate` reads) or a Hugging Face `datasets.Dataset` / `DatasetDict`; rows
given in memory are written once as JSONL under `<output.dir>/../.data/` (named by their
content), so a run folder's config.yaml always names files and `--resume` works.

`model.backend` picks the engine: `mlx` (default) or `cuda` (the PyTorch twin). Importing
`mlxtune` loads none of them; the first call does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, load_config
from .errors import ConfigError, DataError, MlxtuneError

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["Model", "Run", "engine_of", "evaluate", "load", "make_config", "memory_plan", "train"]

DataLike = str | Path | Sequence[Mapping[str, Any]] | Any  # a path, rows, or a datasets.Dataset
Media = Sequence[str | Path]


def engine_of(cfg: Config):
    """The trainer module of the configured backend: MLX, or the PyTorch twin."""
    if cfg.model.backend == "cuda":
        try:
            from cuda_backend import trainer
        except ImportError as e:
            raise MlxtuneError(f"model.backend cuda needs torch and transformers "
                               f"(pip install 'mlxtune[cuda]'): {e}") from None  # fmt: skip
        return trainer
    from . import trainer

    return trainer


# ------------------------------------------------------------------------------------ models


class Model:
    """A loaded model (with an adapter, if one was given), ready to answer prompts.

    `generate` returns the whole reply; `stream` yields it piece by piece. A prompt is a
    user message (str) or a list of chat messages ({"role": ..., "content": ...}, the
    training rows' format, picture and audio parts included)."""

    def __init__(self, cfg: Config, adapter: Path | None = None):
        self.cfg, self.adapter = cfg, adapter
        if cfg.model.backend == "cuda":
            from cuda_backend import model as model_lib
            from cuda_backend.trainer import attach
        else:
            from . import model as model_lib
            from .trainer import attach
        self.loaded = model_lib.load(cfg.model)
        if adapter is not None:
            attach(self.loaded, cfg, adapter)

    @property
    def path(self) -> Path:
        """The local folder the weights came from."""
        return self.loaded.path

    def __repr__(self) -> str:
        with_adapter = f", adapter={str(self.adapter)!r}" if self.adapter else ""
        return (
            f"Model({str(self.cfg.model.path)!r}{with_adapter}, backend={self.cfg.model.backend!r})"
        )

    def _prompt(self, prompt: str | Sequence[Mapping], images: Media, audio: Media):
        from . import generate as gen
        from .data.rows import Row

        cuda = self.cfg.model.backend == "cuda"
        soft = self.cfg.data.image_soft_tokens
        if isinstance(prompt, str) and not images and not audio:
            return gen.user_prompt(self.loaded.tokenizer, prompt)
        if isinstance(prompt, str):
            return gen.media_prompt(self.loaded, prompt, images, audio, soft, round_up=not cuda)
        if images or audio:
            raise DataError("images/audio: put them in the messages' content when the prompt "
                            "is a list of messages")  # fmt: skip
        row = Row("prompt", "chat", tuple(dict(m) for m in prompt))
        return gen.chat_prompt(self.loaded.tokenizer, row, self.loaded.media_plan(soft),
                               round_up=not cuda)  # fmt: skip

    def stream(self, prompt: str | Sequence[Mapping], *, images: Media = (), audio: Media = (),
               max_tokens: int = 256, temp: float = 0.0) -> Iterator[str]:  # fmt: skip
        """Pieces of the reply as they are generated (greedy at `temp` 0)."""
        text = self._prompt(prompt, images, audio)
        if self.cfg.model.backend == "cuda":
            from cuda_backend.generate import stream

            yield from stream(self.loaded, text, max_tokens, temp)
            return
        from .generate import stream

        yield from stream(self.loaded.model, self.loaded.wrapper, text, max_tokens, temp)

    def generate(self, prompt: str | Sequence[Mapping], *, images: Media = (),
                 audio: Media = (), max_tokens: int = 256, temp: float = 0.0) -> str:  # fmt: skip
        """The reply to `prompt`, with these pictures and audio clips (files) before its text."""
        return "".join(self.stream(prompt, images=images, audio=audio, max_tokens=max_tokens,
                                   temp=temp))  # fmt: skip


def load(model: str | Path, adapter: str | Path | Run | None = None, *,
         backend: str | None = None, **model_options: Any) -> Model:  # fmt: skip
    """Load `model` (a Hugging Face id or a local folder) and, optionally, an adapter: a run
    folder, a `Run`, or a PEFT adapter folder. `backend`: "mlx" (default) or "cuda";
    `model_options`: other `model` section keys (`quantize=4`, `dtype="float32"`, ...).
    A run's own settings (its image budget) apply when its folder is given."""
    folder = _adapter_folder(adapter)
    saved = folder / "config.yaml" if folder is not None else None
    base = load_config(saved) if saved is not None and saved.is_file() else None
    section = {**({"backend": backend} if backend else {}), **model_options, "path": str(model)}
    if base is not None:
        section = {**base.to_dict()["model"], **section}
    sections = {"model": section}
    if base is not None:
        sections["data"] = {"image_soft_tokens": base.data.image_soft_tokens}
    return Model(load_config(None, (), sections, "mlxtune.load"), folder)


def _adapter_folder(adapter) -> Path | None:
    if adapter is None:
        return None
    folder = adapter.dir if isinstance(adapter, Run) else Path(adapter)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such adapter or run folder")
    return folder


# -------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Plot:
    """A run's loss plot (a PNG file); a notebook shows it inline."""

    path: Path

    def _repr_png_(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class Run:
    """A run folder: its config, metrics, plot, exports, and the model it trained."""

    dir: Path  # the run folder: config.yaml, metrics.jsonl, the adapter, checkpoints/

    @property
    def config(self) -> Config:
        """The run's settings, as its config.yaml holds them."""
        return load_config(self.dir / "config.yaml")

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl's rows: `kind` "train" (step, loss, lr, tokens/s, peak memory, ...)
        or "valid" (step, loss, perplexity)."""
        from .progress import read_metrics

        return read_metrics(self.dir / "metrics.jsonl")

    def plot(self, out: str | Path | None = None) -> Plot:
        """Draw the loss curves into `out` (default RUN_DIR/loss.png)."""
        from .plot import plot_run

        return Plot(plot_run(self.dir, out))

    def export(self, out: str | Path, format: str = "peft", quant: str = "f16",
               push_to_hub: str | None = None, private: bool = False) -> Path:  # fmt: skip
        """Write the run's model into the folder `out` as `format`: "peft" or "mlx-lm" (the
        adapter), "merged" (a Hugging Face model folder with the adapter folded in) or
        "gguf" (the merged model as one GGUF file of `quant` "f32", "f16", "q8_0" or
        "q4_k_m", for llama.cpp) or "gguf-lora" (the base model's GGUF and llama.cpp's LoRA
        GGUF of the adapter), each with an Ollama Modelfile beside it; returns `out`.
        `push_to_hub`: also upload it, with a model card, to this Hugging Face repo."""
        from .export import export

        return export(self.dir, out, format, quant, push_to_hub, private)

    def load(self, **model_options: Any) -> Model:
        """The run's base model with its adapter; `model_options` override the run's `model`
        section (`backend="cuda"`, `dtype="float32"`, ...)."""
        return load(self.config.model.path, self, **model_options)


def make_config(config: str | Path | Config | None = None, /, *,
                model: str | Path | None = None, data: DataLike | None = None,
                **sections: Any) -> Config:  # fmt: skip
    """The `Config` that `train` would run with these arguments (checked the same way): to
    look at, to check data against (`mlxtune.data.check`), or to pass to `train` and `plan`."""
    return _config(config, model, data, sections, "mlxtune.make_config")


def memory_plan(config: str | Path | Config | None = None, /, *,
                model: str | Path | None = None, vram_gb: float | None = None,
                ram_gb: float | None = None, ranks: int = 1, **sections: Any) -> Plan:  # fmt: skip
    """`mlxtune plan`: the memory of a run of this config per component, while training and
    while loading, on a GPU of `vram_gb` (or a Mac's unified memory) with `ram_gb` of host
    RAM, on each of `ranks` data-parallel devices. Returns a `mlxtune.plan.Plan`: `.table()`,
    `.verdict()`, `.fits`, `.rows`, `.gpu` and `.host` (bytes)."""
    from . import plan as planner

    cfg = _config(config, model, None, sections, "mlxtune.memory_plan")
    return planner.plan(cfg, vram_gb, ram_gb, ranks=ranks)


def train(config: str | Path | Config | None = None, /, *, model: str | Path | None = None,
          data: DataLike | None = None, resume: bool = False,
          echo: Callable[[str], None] | None = print, **sections: Any) -> Run:  # fmt: skip
    """Fine-tune and return the `Run`. `config`: a YAML file (or a `Config`); `model`: the
    model's id or folder; `data`: the training data (see the module's help) or a mapping of
    `data` keys; `sections`: config sections as dicts (`lora={"rank": 16}`,
    `train={"iters": 100}`, `output={"dir": "runs/x"}`), checked as YAML is. `resume`:
    continue the run in `output.dir`. `echo`: where progress lines go (None: silent)."""
    cfg = _config(config, model, data, sections, "mlxtune.train")
    run_dir = engine_of(cfg).train(cfg, resume=resume, echo=echo or (lambda line: None))
    return Run(Path(run_dir))


def evaluate(model: str | Path | Model | Run | Config, data: DataLike | None = None, *,
             adapter: str | Path | Run | None = None, max_rows: int = 200,
             **sections: Any) -> dict:  # fmt: skip
    """Loss, perplexity and exact-match accuracy (greedy answers to rows that end with one,
    at most `max_rows`; 0 skips it) of `model` on `data` (default: the config's data.valid);
    for preference pairs (rows with chosen and rejected), `choice_accuracy`, the share of
    pairs whose chosen answer the model finds likelier, and each side's mean log-probability.
    `model`: an id or folder, a loaded `Model` (its base and adapter), a `Run` (its model
    and adapter) or a `Config`."""
    if isinstance(model, Run):
        adapter, model = adapter or model, model.config
    if isinstance(model, Model):
        adapter, model = adapter or model.adapter, model.cfg
    base = model if isinstance(model, Config) else None
    if base is not None and sections:
        raise ConfigError("evaluate: give a Config or keyword sections, not both")
    cfg = base or _config(None, model, None, sections, "mlxtune.evaluate")
    path = _data_file(data, cfg, "valid") if data is not None else cfg.data.valid
    if not path:
        raise ConfigError(
            "data.valid: not set; give it in the config, or the data to evaluate "
            "(mlxtune eval --data FILE)"
        )
    return _evaluate(cfg, str(path), _adapter_folder(adapter), max_rows)


def _evaluate(cfg: Config, path: str, adapter: Path | None, max_rows: int) -> dict:
    from .data.pairs import holds_pairs
    from .data.rows import read_rows

    trainer = engine_of(cfg)
    engine = trainer.setup(cfg, adapter)
    if holds_pairs(path):  # preference pairs: how the model ranks each pair's answers
        if cfg.model.backend == "cuda":
            from cuda_backend.preference import evaluate_file
        else:
            from .preference import evaluate_file

        return {"data": path, **evaluate_file(engine, path)}
    result = {"data": path, **trainer.evaluate(engine, engine.dataset(path))}
    if max_rows:  # the same metrics on both backends
        rows = read_rows(path)
        if cfg.model.backend == "cuda":
            from cuda_backend.generate import exact_match

            result |= exact_match(engine.loaded, rows, max_rows, engine.media)
        else:
            from .generate import exact_match

            result |= exact_match(engine.model, engine.loaded.wrapper, rows, max_rows,
                                  engine.media)  # fmt: skip
    return result


# -------------------------------------------------------------------------------------- data


def _config(config, model, data, sections: dict, origin: str) -> Config:
    sections = dict(sections)
    if model is not None:
        if isinstance(model, Mapping):
            sections["model"] = {**model}
        else:
            sections["model"] = {**sections.get("model", {}), "path": str(model)}
    if isinstance(config, Config):
        if sections or data is not None:
            merged = config.to_dict()
            for k, v in sections.items():
                merged[k] = {**merged.get(k, {}), **v} if isinstance(v, Mapping) else v
            sections = merged
            config = None
        else:
            return config
    cfg = load_config(config, (), sections, origin)
    if data is None:
        return cfg
    files = _data_files(data, cfg)
    return load_config(config, (), {**sections, "data": {**sections.get("data", {}), **files}},
                       origin)  # fmt: skip


def _data_files(data: DataLike, cfg: Config) -> dict[str, str]:
    """data.train (and data.valid) for what `mlxtune.train(data=...)` was given."""
    splits = _splits(data)
    if splits is not None:  # a DatasetDict
        return {k: _data_file(v, cfg, k) for k, v in splits.items()}
    if isinstance(data, Mapping):  # data section keys
        out = dict(data)
        for split in ("train", "valid"):
            if out.get(split) is not None:
                out[split] = _data_file(out[split], cfg, split)
        return out
    if isinstance(data, str | Path) and Path(data).is_dir():
        folder = Path(data)
        train_file = folder / "train.jsonl"
        if not train_file.is_file():
            raise DataError(f"{folder}: no train.jsonl in this folder")
        valid = folder / "valid.jsonl"
        return {"train": str(train_file), **({"valid": str(valid)} if valid.is_file() else {})}
    return {"train": _data_file(data, cfg, "train")}


def _splits(data) -> dict | None:
    """A Hugging Face DatasetDict's splits as train/valid, else None."""
    if not isinstance(data, Mapping) or not data or \
            not all(hasattr(split, "column_names") for split in data.values()):  # fmt: skip
        return None
    names = list(data)
    train_split = "train" if "train" in names else names[0]
    valid_split = next((n for n in ("valid", "validation", "test") if n in names), None)
    out = {"train": data[train_split]}
    if valid_split:
        out["valid"] = data[valid_split]
    return out


def _data_file(data: DataLike, cfg: Config, split: str) -> str:
    """A path as it is; rows in memory written once as JSONL, named by their content."""
    if isinstance(data, str | Path):
        if not Path(data).exists():
            raise DataError(f"{data}: no such file")
        return str(data)
    rows = _rows(data, split)
    try:
        text = "".join(json.dumps(r, ensure_ascii=False, default=_plain) + "\n" for r in rows)
    except (TypeError, ValueError) as e:
        raise DataError(f"data ({split}): a row does not convert to JSON ({e})") from None
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(cfg.output.dir).parent / ".data"
    path = folder / f"{split}-{digest}.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


def _rows(data: Iterable, split: str) -> list[dict]:
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        # Arrow gives every row every column (and every message every key) seen anywhere,
        # as null where the row had none: drop those to get the rows back as they were.
        data = [_without_nulls(row) for row in data.to_list()]
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise DataError(f"data ({split}): expected a JSONL path, a folder, a list of rows or a "
                        f"datasets.Dataset, got {type(data).__name__}")  # fmt: skip
    rows = list(data)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"data ({split}) row {i}: expected a mapping, got "
                            f"{type(row).__name__}")  # fmt: skip
    if not rows:
        raise DataError(f"data ({split}): no rows")
    return [dict(r) for r in rows]


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """JSON for what datasets rows may hold beyond JSON's types (numpy scalars, paths)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
