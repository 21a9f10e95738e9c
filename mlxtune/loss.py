"""Cross-entropy over a large vocabulary without the full [tokens x vocab] logits.

The head runs on `chunk` rows at a time. For training, each chunk's gradient is formed in the
forward pass: the loss is the graph's last node, so d(loss)/d(hidden) of a chunk can be taken
right away (one pass through the head forward, one back) and only the small [tokens x hidden]
result is kept; the backward pass just scales it by the incoming cotangent. Two passes through
the [vocab x hidden] head per chunk, as plain autodiff would do, but never more than a chunk's
logits alive, instead of all of them waiting for the backward pass. Any head
works: a tied or quantized embedding, an `lm_head`, Gemma's logit softcapping.

The head's own weights get no gradient here (they are frozen under LoRA); a run that trains
them (full fine-tuning) computes full logits instead.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

Head = Callable[[mx.array], mx.array]


def chunked_loss(head: Head, chunk: int, grad: bool = True) -> Callable[..., mx.array]:
    """f(hidden [N, D], targets [N], weights [N]) -> sum of weighted token losses (fp32).

    `grad=False` gives the forward-only version (evaluation): no gradient work at all."""

    def logits_of(h: mx.array) -> mx.array:
        return head(h).astype(mx.float32)

    def chunks(h, t, w):
        for s in range(0, h.shape[0], chunk):
            yield h[s : s + chunk], t[s : s + chunk], w[s : s + chunk]

    def token_losses(logits: mx.array, t: mx.array) -> mx.array:
        target = mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return mx.logsumexp(logits, axis=-1) - target

    if not grad:

        def forward_only(h, t, w):
            total = mx.array(0.0, dtype=mx.float32)
            for hc, tc, wc in chunks(h, t, w):
                total = total + (token_losses(logits_of(mx.depends(hc, total)), tc) * wc).sum()
            return total

        return forward_only

    @mx.custom_function
    def loss_and_grad(h, t, w):
        total, grads = mx.array(0.0, dtype=mx.float32), []
        for hc, tc, wc in chunks(h, t, w):

            def chunk_loss(x, tc=tc, wc=wc):
                return (token_losses(logits_of(x), tc) * wc).sum()

            if grads:  # one chunk after another: each waits for the previous loss and gradient,
                hc = mx.depends(hc, [total, grads[-1]])  # whose graphs hold that chunk's logits
            value, dh = mx.value_and_grad(chunk_loss)(hc)  # one pass forward, one back
            total = total + value
            grads.append(dh)
        return total, mx.concatenate(grads, axis=0)

    @loss_and_grad.vjp
    def loss_and_grad_vjp(primals, cotangents, outputs):
        _, t, w = primals
        return outputs[1] * cotangents[0], mx.zeros_like(t), mx.zeros_like(w)

    def loss(h, t, w):
        return loss_and_grad(h, t, w)[0]

    return loss


def full_logits_loss(logits: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """The plain reference: sum of weighted token losses from materialised logits."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    return (ce * weights).sum()
