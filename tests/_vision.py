"""Checks that need torchvision (and timm), each run in its own subprocess.

Why a subprocess: PyPI's torchvision wheel is built against CUDA torch; beside the CPU torch here
its C++ ops do not load and `import torchvision` fails, and transformers imports torchvision
whenever it is installed, so installing it in the venv would break every transformers model
import. `make setup` therefore installs torchvision + timm into `.venv/vision-site`, outside
sys.path. `run(check, *args)` starts Python with that folder on PYTHONPATH, loads
`_torchvision_compat` first, calls `check(*args)` from this file and returns what it returned.

Needed by: Gemma 3n's vision tower (timm's MobileNetV5), and the full `AutoProcessor` of Gemma 4
and Llama 4 (their image processors are torchvision-based).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SITE = Path(sys.prefix) / "vision-site"
HERE = Path(__file__).resolve().parent


def run(check: str, *args: str) -> dict:
    """Run `check(*args)` in a subprocess with torchvision importable; returns its JSON result."""
    import pytest

    if not SITE.is_dir():
        pytest.skip(f"{SITE} is missing: `make setup` installs torchvision + timm there")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), str(HERE)]))
    cmd = [sys.executable, str(Path(__file__)), check, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{check} failed in the vision subprocess:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ the checks (subprocess side only)


def load_and_resave(path: str, auto_class: str) -> dict:
    """Load with the family's Auto class; compare names/shapes with what save_pretrained writes."""
    import tempfile

    import transformers
    from safetensors.numpy import load_file

    model, info = getattr(transformers, auto_class).from_pretrained(path, output_loading_info=True)
    ours = {k: list(v.shape) for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    theirs: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for f in sorted(Path(tmp).glob("*.safetensors")):
            theirs |= {k: list(v.shape) for k, v in load_file(str(f)).items()}
    return {
        "class": type(model).__name__,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": sorted(map(str, info["mismatched_keys"])),
        "only_ours": sorted(set(ours) - set(theirs)),
        "only_theirs": sorted(set(theirs) - set(ours)),
        "shape_differs": sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k]),
    }


def processor_forward(path: str, arch: str) -> dict:
    """AutoProcessor on a chat with an image (and audio where the family has it), then a forward
    pass of the full model; returns counts the test compares with the family's real numbers."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    parts = [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]
    kwargs: dict = {"images": [image]}
    if arch in ("gemma4", "gemma3n"):
        t = np.arange(16_000) / 16_000  # 1 s at 16 kHz
        kwargs["audio"] = [(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)]
        parts.append({"type": "audio"})
    chat = [{"role": "user", "content": parts}, {"role": "assistant", "content": "Red."}]
    text = proc.tokenizer.apply_chat_template(chat, tokenize=False)
    inputs = proc(text=[text], return_tensors="pt", **kwargs)
    # Llama 4's processor emits bfloat16 pixels (as Meta's code does); this model is float32.
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = model(**inputs, labels=ids)
    cfg = model.config
    audio_id = getattr(cfg, "audio_token_id", None)
    return {
        "class": type(model).__name__,
        "image_tokens": int((ids == cfg.image_token_id).sum()),
        "audio_tokens": int((ids == audio_id).sum()) if audio_id is not None else 0,
        "logits_shape": list(out.logits.shape),
        "vocab_size": cfg.text_config.vocab_size,
        "finite": bool(torch.isfinite(out.logits).all() and torch.isfinite(out.loss)),
        "pixel_values_shape": list(inputs["pixel_values"].shape),
    }


def processor_ids(path: str, jsonl: str, budget: str = "") -> dict:
    """input_ids from the family's processor (AutoProcessor: Gemma4Processor, Gemma3nProcessor)
    for each chat row of a JSONL file (media paths relative to it; clips read as 16 kHz mono by
    mlxtune, since resampling is not what is compared here). `budget`: Gemma 4's soft tokens."""
    from PIL import Image
    from transformers import AutoProcessor

    from mlxtune.data.media import AudioSpec, read_audio

    proc = AutoProcessor.from_pretrained(path)
    folder = Path(jsonl).parent
    out = []
    for line in Path(jsonl).read_text().splitlines():
        messages = json.loads(line)["messages"]
        parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
        images = [Image.open(folder / p["image"]).convert("RGB") for p in parts
                  if p["type"] == "image"]  # fmt: skip
        audio = [read_audio(folder / p["audio"], "", AudioSpec()) for p in parts
                 if p["type"] == "audio"]  # fmt: skip
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False)
        kwargs: dict = {"images": [images]} if images else {}
        if audio:
            kwargs["audio"] = audio
        if budget:
            kwargs["images_kwargs"] = {"max_soft_tokens": int(budget)}
        # the chat template already wrote <bos>: as apply_chat_template(tokenize=True) does
        enc = proc(text=[text], add_special_tokens=False, **kwargs)
        out.append([int(i) for i in enc["input_ids"][0]])
    return {"ids": out}


def gemma3n_vision_reference(path: str, *files: str) -> dict:
    """Gemma 3n's vision tower (timm's MobileNetV5 in TimmWrapperModel), float32, eval mode.
    `files` are (pixels.npy, out.npy) pairs: NCHW pixels in [0, 1] in, `last_hidden_state`
    ([B, 2048, 16, 16]) out. Several inputs share one model load (the subprocess is the cost)."""
    import numpy as np
    import torch
    from transformers import Gemma3nForConditionalGeneration

    model = Gemma3nForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    shapes = []
    for pixels_npy, out_npy in zip(files[::2], files[1::2], strict=True):
        pixels = torch.from_numpy(np.load(pixels_npy)).float()
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values=pixels, do_pooling=False, return_dict=True)
        hidden = out.last_hidden_state.float().numpy()
        np.save(out_npy, hidden)
        shapes.append(list(hidden.shape))
    return {"shapes": shapes}


def gemma3n_forward(path: str, inputs: str, out: str, adapter: str = "") -> dict:
    """transformers' Gemma3nForConditionalGeneration (float32, eval) on each row of the `inputs`
    .npz alone (ids{r} [1, L], pixels{r} NCHW in [0, 1], features{r} [1, T, 128], mask{r}):
    logits, the vision tower's output and the embedded image and audio soft tokens, to `out`.
    With `adapter`, PEFT loads it onto the model first, and only the logits are kept."""
    import numpy as np
    import torch
    from transformers import Gemma3nForConditionalGeneration

    model = Gemma3nForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if adapter:
        import peft

        peft_model = peft.PeftModel.from_pretrained(model, adapter).eval()
    data, result = np.load(inputs), {}
    rows = sorted(int(k[3:]) for k in data.files if k.startswith("ids"))
    for r in rows:
        kwargs = {"input_ids": torch.from_numpy(data[f"ids{r}"])}
        if f"pixels{r}" in data.files:
            kwargs["pixel_values"] = torch.from_numpy(data[f"pixels{r}"])
        if f"features{r}" in data.files:
            kwargs["input_features"] = torch.from_numpy(data[f"features{r}"])
            kwargs["input_features_mask"] = torch.from_numpy(data[f"mask{r}"])
        with torch.no_grad():
            if adapter:
                result[f"logits{r}"] = peft_model(**kwargs).logits.numpy()
                continue
            result[f"logits{r}"] = model(**kwargs).logits.numpy()
            if "pixel_values" in kwargs:
                pixels = kwargs["pixel_values"]
                tower = model.model.vision_tower(pixel_values=pixels, do_pooling=False)
                result[f"tower{r}"] = tower.last_hidden_state.flatten(2).transpose(1, 2).numpy()
                result[f"image{r}"] = model.model.get_image_features(pixels).pooler_output.numpy()
            if "input_features" in kwargs:
                mask = kwargs["input_features_mask"]
                audio = model.model.get_audio_features(kwargs["input_features"], ~mask)
                result[f"audio{r}"] = audio.pooler_output[~audio.audio_mel_mask].numpy()
    np.savez(out, **result)
    return {"rows": len(rows)}


def timm_parameters(arch: str, model_args: str) -> dict:
    """Parameter names and shapes of `timm.create_model(arch, **json model_args)` (built on the
    meta device: nothing is allocated), classifier head left out, and its buffers."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **json.loads(model_args))
    return {
        "shapes": {n: list(p.shape) for n, p in model.named_parameters()
                   if not n.startswith("classifier.")},
        "buffers": [n for n, _ in model.named_buffers()],
    }  # fmt: skip


def twin_splits(path: str) -> dict:
    """Whether the PyTorch twin's chunked loss applies to this (Gemma 3n) checkpoint: its model
    splits into body and head, and the chunked loss equals the full-logits loss."""
    import torch

    from cuda_backend import model as cuda_model
    from cuda_backend.loss import chunked_loss, full_logits_loss
    from mlxtune.config import load_config

    loaded = cuda_model.load(load_config(None, [f"model.path={path}", "model.backend=cuda"]).model)
    split = cuda_model.split_head(loaded.model)
    if split is None:
        return {"split": False}
    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0, :-1]
        hidden = split.body(ids)[0, :-1]
    targets, weights = ids[0, 1:], torch.ones(ids.shape[1] - 1)
    full = float(full_logits_loss(logits, targets, weights))
    chunked = float(chunked_loss(split.head, 8, grad=False)(hidden, targets, weights))
    return {"split": True, "full": full, "chunked": chunked}


if __name__ == "__main__":
    import _torchvision_compat  # noqa: F401  (before anything imports torchvision)

    print(json.dumps(globals()[sys.argv[1]](*sys.argv[2:])))
