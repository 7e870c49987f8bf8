"""PGD (Madry et al.): the untargeted projected-gradient attack on the cross-entropy that adversarial training runs
on every batch, in the Linf or L2 ball, from a random start, inputs kept in ``[0, 1]``.

Its random start is drawn from the generator it is given (``rng``), which :func:`graphsparse.robust.train.train` seeds
per epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from graphsparse.errors import closest

__all__ = ["NORMS", "check_norm", "pgd_attack"]

NORMS = ("Linf", "L2")
"""Threat models of :func:`pgd_attack`."""


def check_norm(norm: str) -> str:
    """``norm`` when it is one of :data:`NORMS`; else a ValueError naming the closest."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}{closest(norm, NORMS)}; valid norms: {', '.join(NORMS)}")
    return norm


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _random_start(x: torch.Tensor, eps: float, norm: str, rng: torch.Generator | None) -> torch.Tensor:
    where = rng.device if rng is not None else x.device
    if norm == "Linf":
        delta = (2 * torch.rand(x.shape, generator=rng, dtype=x.dtype, device=where) - 1) * eps
    else:  # uniform in the L2 ball: Gaussian direction, radius eps * u^(1/d)
        direction = torch.randn(x.shape, generator=rng, dtype=x.dtype, device=where)
        direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
        u = torch.rand(x.shape[0], generator=rng, dtype=x.dtype, device=where)
        delta = direction * (eps * u.pow(1.0 / x[0].numel())).reshape(-1, *([1] * (x.dim() - 1)))
    return delta.to(x.device)


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    norm: str = "Linf",
    rng: torch.Generator | None = None,
    *,
    random_start: bool = True,
) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy (Madry et al.): the adversarial version of ``x``.

    The model is run in whatever mode it is in; no parameter gradients are accumulated.

    Args:
        model: the classifier (logits out), fed inputs in ``[0, 1]``.
        x: clean inputs in ``[0, 1]``; y: their labels.
        eps: radius of the threat ball (``>= 0``); ``0`` returns ``x`` unchanged.
        step: step size (Linf: per-coordinate sign step; L2: length of the normalised gradient step).
        steps: number of gradient steps (``>= 0``; 0 gives the random start only).
        norm: ``"Linf"`` or ``"L2"``.
        rng: generator of the random start (on ``x``'s device, or a CPU generator); None uses the global RNG.
        random_start: start from a uniform random point of the ball (Madry) instead of ``x``.

    Returns:
        ``x_adv`` (detached) with ``‖x_adv − x‖ ≤ eps`` in the chosen norm (up to float rounding for L2)
        and every value in ``[0, 1]``.
    """
    check_norm(norm)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    delta = _random_start(x, eps, norm, rng) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp(0.0, 1.0) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "Linf":
                delta = delta + step * grad.sign()
            else:
                delta = delta + step * grad / _per_sample_norm(grad).clamp_min(1e-12)
            delta = _project(delta, eps, norm)
            delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).detach()
