"""transformers' Gemma 3n as the reference, run in the torchvision subprocess (its vision tower is
timm's): what it makes of our encoded examples."""

from __future__ import annotations

from pathlib import Path

import _vision
import numpy as np


def hf_forward(checkpoint: Path, examples: list, folder: Path, adapter: Path | None = None) -> dict:
    """Each example alone through `Gemma3nForConditionalGeneration` (+ a PEFT adapter), from the
    same ids, pixels (/ 255) and mel features as ours: logits{r}, and without an adapter also
    tower{r} / image{r} (vision tower output, embedded) and audio{r} (embedded, real rows)."""
    arrays = {}
    for r, ex in enumerate(examples):
        arrays[f"ids{r}"] = ex.ids[None, :-1].astype(np.int64)
        images = [m.arrays()[0] for m in ex.media if m.kind == "image"]
        if images:
            arrays[f"pixels{r}"] = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255
        clips = [m.arrays()[0] for m in ex.media if m.kind == "audio"]
        if len(clips) > 1:
            raise ValueError("one clip per row: transformers pads a batch of clips")
        if clips:
            arrays[f"features{r}"] = clips[0][None]
            arrays[f"mask{r}"] = np.ones((1, len(clips[0])), bool)
    np.savez(folder / "in.npz", **arrays)
    _vision.run("gemma3n_forward", checkpoint, folder / "in.npz", folder / "out.npz",
                *([adapter] if adapter else []))  # fmt: skip
    return dict(np.load(folder / "out.npz"))
