"""Is this string the name of an environment variable, or a key pasted where a name belongs?

Stdlib only: `mlxtune.config` refuses such values for `*_env` keys, and `fusion` before it looks
a variable up. A value that looks like a key is never echoed: not in a config error, a CLI
line, a server's error body or a trace.
"""

from __future__ import annotations

import re

# Case-sensitive: `HF_TOKEN` is a variable's name, `hf_AbC...` is a Hugging Face token.
KEY_PREFIXES = (
    "sk-", "sk_", "rk_", "pk_", "hf_", "gsk_", "xai-", "pplx-", "nvapi-", "r8_", "fw_", "csk-",
    "tgp_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "xoxb-", "xoxp-",
    "AKIA", "ASIA", "AIza",
)  # fmt: skip
_RUN = re.compile(r"[A-Za-z0-9]+")


def looks_like_secret(name: str) -> bool:
    """True when `name` is shaped like an API key or token rather than a variable's name: a
    known key prefix followed by 16+ random-looking characters, 16+ characters that a variable
    name never holds (`-`, `.`, `+`, `/`, `=`, ...), or a run of 20+ letters and digits without
    an underscore that mixes digits, lower and upper case (32+: any run). `OPENROUTER_API_KEY`,
    `HF_TOKEN` and `hf_token` are names; `hf_AbCd...`, `gsk_...`, `sk-...` and a 40-digit hex
    string are keys."""
    for prefix in KEY_PREFIXES:
        rest = name[len(prefix) :]
        if name.startswith(prefix) and len(rest) >= 16 and _mixed(rest):
            return True
    if len(name) >= 16 and re.search(r"[^A-Za-z0-9_]", name):
        return True
    return any(len(run) >= 32 or len(run) >= 20 and _mixed(run) for run in _RUN.findall(name))


def _mixed(text: str) -> bool:
    """Two or more of: digits, lower case, upper case (random characters almost always are)."""
    kinds = (any(c.isdigit() for c in text), any(c.islower() for c in text),
             any(c.isupper() for c in text))  # fmt: skip
    return sum(kinds) >= 2
