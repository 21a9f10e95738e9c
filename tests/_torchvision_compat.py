"""Let torchvision's pure-Python parts import beside a CPU-only torch. Import before torchvision.

PyPI's torchvision wheel (0.28.0 is `+cu130`) ships C++ ops (`_C.so`) linked against torch's
CUDA libraries, so beside the `+cpu` torch build they fail to load. torchvision then skips every
op registration guarded by `_has_ops()`, except two unguarded
`torch.library.register_fake("torchvision::nms" / "torchvision::qnms")` calls in
`torchvision/_meta_registrations.py`, which raise "operator torchvision::nms does not exist" and
abort `import torchvision` (and with it timm, and transformers' Gemma 3n vision tower).

`install()` defines just those two operator schemas, so the import finishes. No kernel is added:
`torchvision.ops.nms` still fails loudly if called, while `FrozenBatchNorm2d`, the transforms and
everything timm's MobileNetV5 needs are plain Python/torch. Where torchvision's ops do load (a
matching build) it changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # the torch.library.Library must stay alive, or the schemas go away with it


def install() -> bool:
    """Define the two schemas if torchvision is installed but its C++ ops cannot load.

    Returns True when it defined them. Safe to call again, before or after `import torchvision`.
    """
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if _LIBRARY is not None or spec is None or not spec.submodule_search_locations:
        return False
    import torch

    ops = torch.ops.torchvision
    if not hasattr(ops, "nms"):
        # Load the ops the way torchvision.extension does; a build that matches torch registers
        # them here (and torchvision's own load is then a no-op), a mismatched one raises OSError.
        folder = Path(spec.submodule_search_locations[0])
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if (lib_path := folder / f"_C{suffix}").exists():
                with contextlib.suppress(OSError):
                    torch.ops.load_library(str(lib_path))
                break
    missing = [schema for name, schema in _SCHEMAS.items() if not hasattr(ops, name)]
    if not missing:
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in missing:
        _LIBRARY.define(schema)
    return True


install()
