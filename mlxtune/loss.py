"""Cross-entropy over a large vocabulary without the full [tokens x vocab] logits.

The forward pass runs the head on `chunk` rows at a time and keeps only each row's
log-sum-exp minus its target logit. The backward pass recomputes a chunk's logits, forms
softmax - onehot, and pushes it back through the head with `mx.vjp`, so any head works: a
tied or quantized embedding, an `lm_head`, Gemma's logit softcapping. Peak memory for the
loss is a few [chunk x vocab] buffers instead of several [tokens x vocab] ones.

The head's own weights get no gradient here (they are frozen under LoRA); a run that trains
them (full fine-tuning) uses `full_logits_loss` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

Head = Callable[[mx.array], mx.array]


def chunked_loss(head: Head, chunk: int) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """f(hidden [N, D], targets [N], weights [N]) -> sum of weighted token losses (fp32)."""

    def logits_of(h: mx.array) -> mx.array:
        return head(h).astype(mx.float32)

    def token_losses(h: mx.array, t: mx.array) -> mx.array:
        logits = logits_of(h)
        target = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return mx.logsumexp(logits, axis=-1) - target

    @mx.custom_function
    def loss(h: mx.array, t: mx.array, w: mx.array) -> mx.array:
        total = mx.array(0.0, dtype=mx.float32)
        for s in range(0, h.shape[0], chunk):
            total = (
                total + (token_losses(h[s : s + chunk], t[s : s + chunk]) * w[s : s + chunk]).sum()
            )
        return total

    @loss.vjp
    def loss_vjp(primals, cotangent, output):
        h, t, w = primals
        grads = []
        for s in range(0, h.shape[0], chunk):
            hc, tc, wc = h[s : s + chunk], t[s : s + chunk], w[s : s + chunk]
            logits = logits_of(hc)
            onehot = mx.arange(logits.shape[-1])[None, :] == tc[:, None]
            g = (mx.softmax(logits, axis=-1) - onehot) * (wc * cotangent)[:, None]
            grads.append(mx.vjp(logits_of, [hc], [g])[1][0])
        return mx.concatenate(grads, axis=0), mx.zeros_like(t), mx.zeros_like(w)

    return loss


def full_logits_loss(logits: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """The plain reference: sum of weighted token losses from materialised logits."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    return (ce * weights).sum()
