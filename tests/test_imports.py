"""The CLI and the framework-free modules import no mlx, torch or transformers."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("mlx", "torch", "transformers", "mlx_lm")


def heavy_modules_after(code: str) -> list[str]:
    report = f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    probe = f"import sys\n{code}\n{report}"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stderr.split()


def test_light_imports():
    code = (
        "import mlxtune, mlxtune.config, mlxtune.cli, mlxtune.env, mlxtune.tiny, "
        "mlxtune.tiny.real, mlxtune.api, fusion, cuda_backend\n"
        "mlxtune.load, mlxtune.train, mlxtune.evaluate, mlxtune.Model, mlxtune.Run"
    )
    assert heavy_modules_after(code) == []


def test_the_fusion_client_and_server_are_light():
    code = "import fusion.client, fusion.server, fusion.modes, fusion.eval, fusion.wire"
    assert heavy_modules_after(code) == []


def test_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom mlxtune import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
    )
    assert heavy_modules_after(code) == []


def test_every_subcommand_help_is_light():
    from mlxtune.cli import cli

    for name, cmd in cli.commands.items():
        subs = getattr(cmd, "commands", {None: cmd})
        for sub in subs:
            args = [name] + ([sub] if sub else []) + ["--help"]
            code = (
                "from mlxtune import cli\n"
                f"try:\n    cli.main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0\n"
            )
            assert heavy_modules_after(code) == [], args


def test_writing_a_tiny_checkpoint_is_light(tmp_path):
    """numpy + safetensors + tokenizers only, so a Mac without torch can make one."""
    code = "\n".join(
        f"make_tiny({str(tmp_path / arch)!r}, {arch!r})" for arch in ("gemma4", "llama4")
    )
    assert heavy_modules_after(f"from mlxtune.tiny import make_tiny\n{code}") == []
