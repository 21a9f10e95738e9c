"""mlxtune: fine-tuning on Apple Silicon with MLX (and a PyTorch twin for NVIDIA GPUs).

    import mlxtune as mt
    model = mt.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    run = mt.train(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="data/", train={"iters": 100})
    print(run.load().generate("Hello"))

Importing this pulls in nothing heavy: `load`, `train`, `evaluate`, `make_config`,
`memory_plan`, `Model` and `Run` come from `mlxtune.api` on first use, and MLX or torch only
when a model is loaded. See help(mt.train).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Model", "Run", "evaluate", "load", "make_config", "memory_plan", "train"]

if TYPE_CHECKING:  # for type checkers and editors; at run time, __getattr__ below
    from .api import Model, Run, evaluate, load, make_config, memory_plan, train


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlxtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
