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
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Per sample, whether ``model`` classifies it correctly (bool, CPU), how many samples have an input gradient
    of the cross-entropy loss that is exactly zero everywhere, and the logits (CPU): one forward and backward
    pass (the logits the gradient needs are the clean predictions; a separate clean pass would repeat the
    forward, and :func:`run_attack` hands these logits to AutoAttack's own clean pass)."""
    correct = []
    logits_cpu = []
    count = 0
    for i in range(0, s.x.shape[0], batch_size):
        x = s.x[i : i + batch_size].to(device).requires_grad_(True)
        y = s.y[i : i + batch_size].to(device)
        with torch.enable_grad():
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x], allow_unused=True)
        logits = logits.detach()
        correct.append((logits.argmax(1) == y).cpu())
        logits_cpu.append(logits.cpu())
        if grad is None:
            count += x.shape[0]
        else:
            count += int((grad.reshape(grad.shape[0], -1).abs().sum(1) == 0).sum())
    return torch.cat(correct), count, torch.cat(logits_cpu)


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


class _CleanLogits:
    """The model as AutoAttack's own passes over a clean chunk see it: for that chunk, bit for bit, the logits
    evaluate's clean pass computed (:func:`clean_and_zero_gradient`); for any other input, the model.

    AutoAttack runs, before every attack, a clean pass over its input, an output-range check and a
    dynamic-defence check, each one forward of the same clean samples: 3 forwards a chunk that evaluate has
    already done. Its attacks (APGD, FAB, Square) keep their own reference to the model and never see this."""

    def __init__(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, device: torch.device) -> None:
        self.model = model
        self.x = x.to(device)
        self.logits = logits.to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape == self.x.shape and x.dtype == self.x.dtype and torch.equal(x, self.x):
            return self.logits.clone()
        return self.model(x)


def _model_checks(aa: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, dynamic: bool) -> None:
    """AutoAttack's checks that need forward passes of their own, as its ``run_standard_evaluation`` runs them,
    on the model itself: a randomised defence (five forwards of the same batch must agree) and, with
    ``dynamic``, a dynamic one (the forward pass must not compute gradients)."""
    from pyautoattack import checks

    checks.check_randomized(model, x, y, bs=batch_size, logger=aa.logger)
    if dynamic:
        _reset_dynamic_check()
        checks.check_dynamic(model, x, False, logger=aa.logger)
        _reset_dynamic_check()  # or the check AutoAttack repeats on the clean logits would report it again


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
    model_checks: bool = True,
    clean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Run one attack entry through AutoAttack on ``model`` as it is now.

    Args:
        model_checks: run AutoAttack's checks for a randomised or dynamic defence (six forward passes of the
            first batch; repeated for every chunk they were 11% of an evaluation of the demo model at 10 steps).
            Its output-range check runs on every call.
        clean: the logits of ``s`` from evaluate's clean pass (CPU): AutoAttack's own clean pass and range check
            read them instead of running the model again, and the re-check of the adversarial examples
            re-evaluates only the inputs the attack changed. ``None`` runs those forwards.

    Returns:
        ``(robust, messages)``: per sample (bool, CPU), still classified correctly after the attack; the
        warnings AutoAttack (or anything it called) raised, plus graphsparse's checks of its output.
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
        aa.version = "rand"  # after __init__, 'rand' only skips check_randomized (pyautoattack 0.2): _model_checks
        _reset_dynamic_check()
        if model_checks:
            head = slice(0, batch_size)
            # without clean logits AutoAttack runs its dynamic check on the model, for every chunk
            _model_checks(aa, model, s.x[head].to(device), s.y[head].to(device), batch_size, clean is not None)
        if clean is not None:  # after the checks, which need the model itself; the attacks hold their own reference
            aa.model = _CleanLogits(model, s.x, clean, device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # AutoAttack reseeds the global generator
            x_adv, y_adv = aa.run_standard_evaluation(s.x, s.y, batch_size=batch_size)
    robust = y_adv.cpu() == s.y
    count = int(robust.sum())
    x_adv = x_adv.cpu()
    delta = (x_adv - s.x).reshape(s.x.shape[0], -1)
    size = {"Linf": delta.abs().amax(1), "L2": delta.norm(dim=1), "L1": delta.abs().sum(1)}[norm]
    if bool((size > eps * (1 + 1e-4) + 1e-6).any()) or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
        messages.append(
            f"graphsparse: adversarial examples leave the {norm} ball of radius {eps:g} or [0, 1] "
            f"(largest perturbation {float(size.max()):.6g})"
        )
    if clean is None:
        again = forward_batches(model, x_adv, batch_size, device) == s.y
    else:  # an input the attack left as it was is a clean sample, whose prediction the clean pass made
        again = clean.argmax(1) == s.y
        changed = (x_adv != s.x).reshape(x_adv.shape[0], -1).any(1)
        if bool(changed.any()):
            again[changed] = forward_batches(model, x_adv[changed], batch_size, device) == s.y[changed]
    recheck = int(again.sum())
    if recheck != count:
        messages.append(
            f"graphsparse: re-evaluating AutoAttack's adversarial examples gives {recheck} robust samples, "
            f"AutoAttack counted {count}"
        )
    return robust, messages
