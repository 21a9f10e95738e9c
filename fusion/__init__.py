"""One prompt through a pool of OpenAI-compatible LLMs in parallel, one answer from a judge.

    from fusion import FusionClient
    async with FusionClient(config) as client:      # config: mlxtune.config.Config or its .fusion
        result = await client.run(messages, mode="merge")

Modules: wire (payloads, SSE, errors: pure), client (the session, deadlines, retries, quorum),
modes (best-of, merge, debate, self), result (calls, the result and its report), server (an
OpenAI-compatible endpoint), request (what the server accepts: pure), eval (accuracy against
gold answers). Whether a `*_env` value is a variable's name or a pasted key is
`mlxtune.keys`, used by the config schema.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "FusionClient":  # aiohttp loads only when the client is used
        from .client import FusionClient

        return FusionClient
    if name in ("FusionResult", "Call", "FusionError"):
        from . import result

        return getattr(result, name)
    raise AttributeError(name)
