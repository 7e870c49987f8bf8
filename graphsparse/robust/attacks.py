"""Attack plumbing shared by :func:`graphsparse.evaluate` and :func:`graphsparse.tune`.

The attack names and their canonical keys (:func:`attack_key`; the names are listed in
:mod:`graphsparse.robust.evaluate`), the threat-model checks (:func:`check_threat`), the three model variants
every robust number is measured for (:data:`VARIANTS`, :func:`variant`), the clean and zero-gradient pass
(:func:`clean_and_zero_gradient`) and one AutoAttack run with its warnings captured (:func:`run_attack`;
:func:`forward_batches` re-checks its adversarial examples).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphsparse.errors import EvaluationError, closest
from graphsparse.ops import set_alpha, straight_through
from graphsparse.ops.state import alphas_kept
from graphsparse.robust.samples import Samples

__all__ = [
    "ATTACKS",
    "VARIANTS",
    "attack_key",
    "check_classes",
    "check_threat",
    "clean_and_zero_gradient",
    "forward_batches",
    "import_autoattack",
    "run_attack",
    "set_steps",
    "variant",
]

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
"""AutoAttack components that can be named alone or in a custom cascade."""

_STANDARD_NAMES = ("autoattack", "standard", "aa")

VARIANTS = ("base", "exact", "bpda")
"""The three versions of a model every robust number is measured for."""

_NORMS = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2", "l1": "L1"}

_AA_LOGGER = "auto-attack"


# ------------------------------------------------------------------------------------------- options


def attack_key(attack: str | Sequence[str]) -> str:
    """The canonical name of an attack entry: ``apgd-ce``, ``autoattack`` or ``apgd-ce+apgd-t``.

    Raises:
        EvaluationError: an unknown attack name (the message names the closest valid one).
    """
    parts = _attack_parts(attack)
    return "autoattack" if parts is None else "+".join(parts)


def _attack_parts(attack: str | Sequence[str]) -> list[str] | None:
    """Component names of an attack entry; ``None`` for the standard AutoAttack."""
    if isinstance(attack, str):
        name = attack.strip().lower()
        if name in _STANDARD_NAMES:
            return None
        parts = [p.strip() for p in name.split("+")]
    else:
        parts = [str(p).strip().lower() for p in attack]
    if not parts or any(not p for p in parts):
        raise EvaluationError(f"empty attack name in {attack!r}. Hint: use one of {', '.join(ATTACKS)} or 'autoattack'")
    for p in parts:
        if p not in ATTACKS:
            raise EvaluationError(
                f"unknown attack {p!r}{closest(p, ATTACKS + _STANDARD_NAMES)}. "
                f"Hint: use one of {', '.join(ATTACKS)}, 'autoattack', or a list of components"
            )
    if len(set(parts)) != len(parts):
        raise EvaluationError(f"attack {attack!r} names a component twice. Hint: name each one once")
    return parts


def _check_norm(norm: str) -> str:
    canonical = _NORMS.get(str(norm).strip().lower())
    if canonical is None:
        raise EvaluationError(f"unknown norm {norm!r}{closest(str(norm), ('Linf', 'L2', 'L1'))}. Hint: use Linf or L2")
    return canonical


def _check_eps(eps: float, norm: str = "Linf") -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"eps must be a number, got {eps!r}") from e
    if not (math.isfinite(value) and value > 0):
        raise EvaluationError(f"eps must be a finite number > 0, got {eps!r}. Hint: e.g. 8/255 for Linf")
    if norm == "Linf" and value >= 1:
        raise EvaluationError(
            f"eps = {eps!r} for Linf covers the whole [0, 1] pixel range: ε is in [0, 1] pixel units. "
            f"Hint: {value:g}/255 = {value / 255:.4f}"
        )
    return value


def check_threat(eps: float, norm: str) -> tuple[float, str]:
    """``(eps, norm)`` checked and canonical (``Linf``/``L2``/``L1``), before anything is loaded.

    Raises:
        EvaluationError: an unknown norm, ε not a finite number > 0, or an L∞ ε of 1 or more (ε is in ``[0, 1]``
            pixel units: 8/255, not 8).
    """
    canonical = _check_norm(norm)
    return _check_eps(eps, canonical), canonical


# ------------------------------------------------------------------------------------- model helpers


@contextlib.contextmanager
def variant(model: nn.Module, name: str) -> Iterator[None]:
    """Make ``model`` behave as variant ``name`` (``base``, ``exact`` or ``bpda``) inside the block."""
    if name == "base":
        with alphas_kept(model) as ops:
            if ops:
                set_alpha(model, 0.0)
            yield
    elif name == "bpda":
        with straight_through(model):
            yield
    else:
        yield


def forward_batches(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The classes ``model`` predicts for ``x``, run in batches of ``batch_size`` on ``device`` (on the CPU)."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i : i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out)


def clean_and_zero_gradient(
    model: nn.Module, s: Samples, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Per sample, whether ``model`` classifies it correctly (bool, CPU), and how many samples have an input
    gradient of the cross-entropy loss that is exactly zero everywhere: one forward and backward pass (the
    logits the gradient needs are the clean predictions; a separate clean pass would repeat the forward)."""
    correct = []
    count = 0
    for i in range(0, s.x.shape[0], batch_size):
        x = s.x[i : i + batch_size].to(device).requires_grad_(True)
        y = s.y[i : i + batch_size].to(device)
        with torch.enable_grad():
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x], allow_unused=True)
        correct.append((logits.detach().argmax(1) == y).cpu())
        if grad is None:
            count += x.shape[0]
        else:
            count += int((grad.reshape(grad.shape[0], -1).abs().sum(1) == 0).sum())
    return torch.cat(correct), count


# ------------------------------------------------------------------------------------------ attacks


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Collect AutoAttack's logger warnings and any ``warnings.warn`` inside the block (not printed)."""
    logger = logging.getLogger(_AA_LOGGER)
    handler = _Capture()
    old_level = logger.level
    messages: list[str] = []
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"AutoAttack: {m}" for m in handler.messages)
        for w in caught:
            if w.category is Warning or "pyautoattack" in str(w.filename):
                messages.append(f"AutoAttack: {w.message}")
            else:
                messages.append(f"{w.category.__name__}: {w.message}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def set_steps(attack: Any, steps: int) -> None:
    """Give an APGD attack ``steps`` iterations, with its step-size schedule recomputed as in its __init__."""
    attack.n_iter = steps
    attack.n_iter_orig = steps
    attack.n_iter_2 = max(int(0.22 * steps), 1)
    attack.n_iter_min = max(int(0.06 * steps), 1)
    attack.size_decr = max(int(0.03 * steps), 1)


def _reset_dynamic_check() -> None:
    """pyautoattack's dynamic-defence check counts calls in a module-global dict that is never reset, so
    one detection would be reported for every later model; start each run from zero."""
    try:
        from pyautoattack import checks
    except ImportError:  # pragma: no cover - evaluate() imports AutoAttack first
        return
    funcs = getattr(checks, "funcs", None)
    if isinstance(funcs, dict):
        for k in funcs:
            funcs[k] = 0


def import_autoattack() -> Any:
    """pyautoattack's ``AutoAttack`` class; an :class:`EvaluationError` with the install hint when it is missing."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise EvaluationError(
            "AutoAttack is not installed (PyPI package 'pyautoattack'). Hint: pip install 'graphsparse[eval]'"
        ) from e
    return AutoAttack


_DLR_ATTACKS = ("apgd-dlr", "apgd-t", "fab-t")


def check_classes(entries: Sequence[str | Sequence[str]], n_classes: int) -> None:
    """AutoAttack's DLR losses read the 3rd and 4th largest logits; refuse them below 4 classes."""
    if n_classes >= 4:
        return
    for entry in entries:
        parts = _attack_parts(entry)
        used = [p for p in (parts if parts is not None else ["apgd-t", "fab-t"]) if p in _DLR_ATTACKS]
        if used:
            raise EvaluationError(
                f"attack {attack_key(entry)!r} uses the DLR loss ({', '.join(used)}), which needs at least "
                f"4 classes; the model has {n_classes}. Hint: use apgd-ce"
            )


def run_attack(
    model: nn.Module,
    s: Samples,
    attack: str | Sequence[str],
    *,
    eps: float,
    norm: str,
    batch_size: int,
    seed: int,
    device: torch.device,
    n_classes: int,
    steps: int | None = None,
    check_randomized: bool = True,
) -> tuple[torch.Tensor, list[str]]:
    """Run one attack entry through AutoAttack on ``model`` as it is now.

    Returns:
        ``(robust, messages)``: per sample (bool, CPU), still classified correctly after the attack; the
        warnings AutoAttack (or anything it called) raised, plus graphsparse's checks of its output.

    ``check_randomized=False`` skips AutoAttack's check for a randomised model (two forward passes of the first
    batch, repeated for every chunk otherwise: 11% of an evaluation of the demo model at 10 steps).
    """
    AutoAttack = import_autoattack()
    parts = _attack_parts(attack)
    with _captured_warnings() as messages:
        if parts is None:
            aa = AutoAttack(model, eps=eps, norm=norm, version="standard", seed=seed, device=device)
        else:
            aa = AutoAttack(model, eps=eps, norm=norm, version="custom", attacks=list(parts), seed=seed, device=device)
            # the parameters AutoAttack's standard version uses for each component
            aa.apgd.n_restarts = 1
            aa.apgd_targeted.n_restarts = 1
            aa.fab.n_restarts = 1
        targets = max(1, min(9, n_classes - 1))
        aa.apgd_targeted.n_target_classes = targets
        aa.fab.n_target_classes = targets
        if steps is not None:
            set_steps(aa.apgd, steps)
            set_steps(aa.apgd_targeted, steps)
            aa.fab.n_iter = steps
        if not check_randomized:
            aa.version = "rand"  # after __init__, 'rand' only skips that check (pyautoattack 0.2)
        _reset_dynamic_check()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # AutoAttack reseeds the global generator
            x_adv, y_adv = aa.run_standard_evaluation(s.x, s.y, batch_size=batch_size)
    robust = y_adv.cpu() == s.y
    count = int(robust.sum())
    delta = (x_adv.cpu() - s.x).reshape(s.x.shape[0], -1)
    size = {"Linf": delta.abs().amax(1), "L2": delta.norm(dim=1), "L1": delta.abs().sum(1)}[norm]
    if bool((size > eps * (1 + 1e-4) + 1e-6).any()) or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
        messages.append(
            f"graphsparse: adversarial examples leave the {norm} ball of radius {eps:g} or [0, 1] "
            f"(largest perturbation {float(size.max()):.6g})"
        )
    recheck = int((forward_batches(model, x_adv.cpu(), batch_size, device) == s.y).sum())
    if recheck != count:
        messages.append(
            f"graphsparse: re-evaluating AutoAttack's adversarial examples gives {recheck} robust samples, "
            f"AutoAttack counted {count}"
        )
    return robust, messages
