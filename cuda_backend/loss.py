"""Cross-entropy over a large vocabulary without the full [tokens x vocab] logits: the twin of
mlxtune/loss.py. The head runs on `chunk` rows at a time; in training each chunk's gradient with
respect to its hidden states is formed right away (one head pass forward, one back), so only
one chunk's logits ever exist, and backward only scales the kept [tokens x hidden] gradient.
The head's own weights get no gradient here (frozen under LoRA)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

Head = Callable[[torch.Tensor], torch.Tensor]


def _token_losses(head: Head, h: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(head(h).float(), t, reduction="none") * w).sum()


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, weights, head, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = []
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = _token_losses(head, h, targets[s : s + chunk], weights[s : s + chunk])
            (g,) = torch.autograd.grad(loss, h)
            total = total + loss.detach()
            grads.append(g)
        ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(hidden))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


def chunked_loss(head: Head, chunk: int, grad: bool = True) -> Callable[..., torch.Tensor]:
    """f(hidden [N, D], targets [N], weights [N]) -> sum of weighted token losses (fp32)."""
    if grad:
        return lambda h, t, w: _ChunkedCE.apply(h, t, w, head, chunk)

    def forward_only(h, t, w):
        with torch.no_grad():
            return sum((_token_losses(head, h[s : s + chunk], t[s : s + chunk], w[s : s + chunk])
                        for s in range(0, h.shape[0], chunk)), torch.zeros((), device=h.device))  # fmt: skip

    return forward_only


def full_logits_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """The plain reference: sum of weighted token losses from materialised logits."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()
