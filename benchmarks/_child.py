"""Run one side of a benchmark in its own Python process, which reports its peak resident set."""

from __future__ import annotations

import re
import subprocess
import sys

CHILD = """
import resource, sys, json
try:
    {body}
finally:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("MAXRSS_BYTES", rss if sys.platform == "darwin" else rss * 1024, flush=True)
"""


def run_child(body: str, env: dict) -> tuple[str, int]:
    """(stdout, max RSS in bytes) of `body` run as a script; exits on failure."""
    code = CHILD.format(body=body.strip().replace("\n", "\n    "))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return out.stdout, int(re.search(r"MAXRSS_BYTES (\d+)", out.stdout).group(1))
