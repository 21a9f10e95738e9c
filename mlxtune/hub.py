"""Model folders: a local path, or a Hugging Face repo id fetched into the hub cache.
Framework-free, shared by both backends."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What a training run needs from a repo: weights, configs, tokenizer, chat template.
ALLOW = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jsonl",
         "*.jinja"]  # fmt: skip


def is_repo_id(path: str) -> bool:
    return bool(_REPO_ID.match(path)) and not Path(path).expanduser().exists()


def resolve_path(path: str | None, allow: list[str] | None = None) -> Path:
    """A local model folder, or a Hugging Face repo id fetched (or found in the cache)."""
    if not path:
        raise ModelError("model.path: not set")
    local = Path(path).expanduser()
    if not is_repo_id(path):
        if not (local / "config.json").is_file():
            what = "no config.json in" if local.is_dir() else "folder not found:"
            raise ModelError(f"model.path: {what} {path}")
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=allow or ALLOW))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"model.path: could not fetch {path} from the Hugging Face hub: {reason}"
        ) from None
