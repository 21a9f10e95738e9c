"""The real trained model the tests use: SmolLM2-135M-Instruct in float32, written by
`make real-model` (`python -m mlxtune.tiny.real`; `make setup` runs it too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxtune.tiny.real import DEFAULT_OUT, is_complete


def real_model() -> Path:
    """The cached folder; a test that needs it fails (never skips) when it is missing."""
    if not is_complete(DEFAULT_OUT):
        pytest.fail(f"no real model in {DEFAULT_OUT}: run `make real-model`", pytrace=False)
    return DEFAULT_OUT
