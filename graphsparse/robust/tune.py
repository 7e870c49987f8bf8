"""Tuning: choose MeanSparse's α on the validation split, never the test split.

``tune(model, val_data, eps=...)`` sweeps one global α over every MeanSparse of ``model`` (with
:func:`graphsparse.ops.set_alpha`; the calibrated statistics are not recomputed), measures for each α the
clean accuracy and the robust accuracy under an AutoAttack component (APGD-CE by default, optionally also
with straight-through gradients, BPDA), and picks

    the α with the highest robust accuracy whose clean accuracy is at most ``max_clean_drop``
    percentage points below that of α = 0,

and a non-zero α only with a robust gain: when α = 0 reaches the highest robust accuracy, α = 0 is chosen,
however the clean accuracy of the others moved. Ties between non-zero α go to the higher clean accuracy,
then the smaller α. With ``bpda=True`` the robust accuracy used is the worse of
the exact-gradient and BPDA numbers, so a gain that only comes from gradient masking cannot be chosen.
``per_stage=True`` then runs a coordinate search over the stages of the network (one α per stage).

The data must not be the test split: a graphsparse dataset whose ``split`` is ``test`` or ``all`` (at any
level of ``DataLoader``/``Subset`` wrapping) is refused, and the result records the split name and the
source indices of every sample it read, so "tuning never touched test indices" can be checked afterwards.
Data without that bookkeeping (your own tensors, dataset or loader) cannot be checked: tuning runs on it,
warns (:class:`SplitWarning`, also listed in :attr:`TuneResult.warnings`) and records ``split`` None; so
does data of another split than ``val``.

Accuracies are percentages (0–100).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphsparse._files import atomic_write
from graphsparse.artifact.records import stats_digest, store_record, utc_now
from graphsparse.distributed import rank_and_size
from graphsparse.errors import CalibrationError, DataError, EvaluationError, PlanError
from graphsparse.model_output import logits_output
from graphsparse.ops import MeanSparse, operators, set_alpha, straight_through
from graphsparse.ops.state import eval_mode, model_device
from graphsparse.robust.attack_cache import AttackCache, measure_variant, samples_digest
from graphsparse.robust.attacks import attack_key, check_classes, check_threat
from graphsparse.robust.eval_report import pct, summarise
from graphsparse.robust.samples import (
    UNKNOWN_INDICES,
    check_positive,
    check_radius,
    data_bookkeeping,
    model_classes,
    pick_samples,
)

__all__ = ["DEFAULT_ALPHAS", "SplitWarning", "TunePoint", "TuneResult", "tune", "select_alpha", "site_stages"]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(11))
"""The default sweep: 0, 0.05, ..., 0.5."""

_TOL = 1e-9


class SplitWarning(UserWarning):
    """Tuning data that may not be the validation split: no split bookkeeping, or another split than 'val'."""


# -------------------------------------------------------------------------------------------- result


@dataclass
class TunePoint:
    """One measured configuration.

    Attributes:
        alpha: the α tried (the global α, or the α of ``stage`` in a per-stage row).
        clean: clean accuracy (%).
        robust: robust accuracy under the attack with the exact gradient (%).
        robust_bpda: robust accuracy with straight-through gradients (%), or None when not measured.
        stage: the stage whose α was varied (per-stage rows), None for the global sweep.
    """

    alpha: float
    clean: float
    robust: float
    robust_bpda: float | None = None
    stage: int | None = None

    @property
    def score(self) -> float:
        """The robust accuracy selection uses: the worse of exact and BPDA when BPDA was measured."""
        return self.robust if self.robust_bpda is None else min(self.robust, self.robust_bpda)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TuneResult:
    """The result of :func:`tune`; :meth:`to_dict` is JSON-able and :meth:`from_dict` reads it back.

    Attributes:
        curve: the global sweep, one :class:`TunePoint` per α, in increasing α.
        chosen_alpha: the chosen global α.
        baseline_clean: clean accuracy at α = 0 (%), the reference of the clean-drop bound.
        max_clean_drop: the bound, in percentage points.
        criterion: ``robust`` or ``min(robust, robust_bpda)``.
        attack, eps, norm, n, seed, batch_size, steps: the attack settings.
        split, source: where the samples came from (``split`` None when the data carries no bookkeeping).
        indices: source indices of every sample read (sorted).
        stage_curve: per-stage rows of the coordinate search (empty without ``per_stage``).
        stage_alphas: stage -> chosen α (empty without ``per_stage``).
        site_alphas: site id -> the α set on the model at the end.
        warnings: AutoAttack's check warnings and graphsparse's notes.
        date: ISO 8601 UTC time at which tuning finished.
        stats_sha256: digest of the operators' statistics α was chosen for
            (:func:`graphsparse.artifact.records.stats_digest`).
    """

    curve: list[TunePoint]
    chosen_alpha: float
    baseline_clean: float
    max_clean_drop: float
    criterion: str
    attack: str
    eps: float
    norm: str
    n: int
    seed: int
    batch_size: int
    steps: int | None
    split: str | None
    source: str
    indices: list[int]
    stage_curve: list[TunePoint] = field(default_factory=list)
    stage_alphas: dict[int, float] = field(default_factory=dict)
    site_alphas: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    date: str = ""
    stats_sha256: str = ""

    @property
    def chosen(self) -> TunePoint:
        """The point of :attr:`curve` at :attr:`chosen_alpha`."""
        return next(p for p in self.curve if math.isclose(p.alpha, self.chosen_alpha, abs_tol=_TOL))

    def rows(self) -> list[dict[str, Any]]:
        """The global curve as rows ``alpha, clean, robust[, robust_bpda]``."""
        bpda = any(p.robust_bpda is not None for p in self.curve)
        keys = ["alpha", "clean", "robust"] + (["robust_bpda"] if bpda else [])
        return [{k: getattr(p, k) for k in keys} for p in self.curve]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("curve", "stage_curve"):
                value = [p.to_dict() for p in value]
            elif f.name == "stage_alphas":
                value = {str(k): v for k, v in value.items()}
            elif isinstance(value, (list, dict)):
                value = type(value)(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneResult:
        """Inverse of :meth:`to_dict` (e.g. the ``tuning`` record of an artifact); unknown keys ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("curve", "stage_curve"):
            kw[key] = [TunePoint(**p) for p in kw.get(key, [])]
        kw["stage_alphas"] = {int(k): float(v) for k, v in dict(kw.get("stage_alphas", {})).items()}
        return cls(**kw)

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temporary file + ``os.replace``)."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the global curve (:meth:`rows`) as CSV, atomically."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=list(rows[0]) if rows else ["alpha", "clean", "robust"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------------------- selection


def select_alpha(
    points: Sequence[TunePoint],
    *,
    max_clean_drop: float = 0.5,
    baseline_clean: float | None = None,
    reference_alpha: float = 0.0,
) -> TunePoint:
    """The point with the highest :attr:`TunePoint.score` whose clean drop is within the bound.

    Args:
        points: measured points.
        max_clean_drop: largest allowed ``baseline_clean - clean``, in percentage points.
        baseline_clean: the reference clean accuracy; default that of the point with α = 0.
        reference_alpha: the α kept unless another brings a robust gain (0; in a per-stage search, the
            stage's current α).

    Another α than ``reference_alpha`` wins only with a higher score: a clean accuracy that moved by a
    sample is no reason to change α. Ties between the others go to higher clean accuracy, then smaller α.

    Raises:
        EvaluationError: no α = 0 point and no ``baseline_clean``, or no point within the bound.
    """
    if baseline_clean is None:
        zero = [p for p in points if p.alpha == 0.0 and p.stage is None]
        if not zero:
            raise EvaluationError("no alpha = 0 point to measure the clean drop from. Hint: include 0 in alphas")
        baseline_clean = zero[0].clean
    feasible = [p for p in points if baseline_clean - p.clean <= max_clean_drop + _TOL]
    if not feasible:
        raise EvaluationError(
            f"no alpha keeps the clean accuracy within {max_clean_drop:g} points of {baseline_clean:.2f}%. "
            "Hint: raise max_clean_drop or include alpha = 0"
        )
    best = max(feasible, key=lambda p: (p.score, p.clean, -p.alpha))
    reference = [p for p in feasible if math.isclose(p.alpha, reference_alpha, abs_tol=_TOL)]
    if reference and reference[0].score >= best.score - _TOL:
        return reference[0]
    return best


# -------------------------------------------------------------------------------------------- stages


def site_stages(model: nn.Module) -> tuple[dict[str, int], bool]:
    """Site id -> stage index for every MeanSparse of ``model``, and whether the stages are known.

    Stages come from the plan of a rewritten model (``rewrite_info(model).plan``), else from an operator's
    ``stage`` attribute; operators with neither are put in stage 0 (and the flag is False).
    """
    from graphsparse.planning.rewrite import rewrite_info

    ops = operators(model, types=(MeanSparse,))
    by_plan: dict[str, int] = {}
    try:
        by_plan = {e.site.id: int(e.site.stage) for e in rewrite_info(model).plan}
    except PlanError:
        pass
    stages: dict[str, int] = {}
    known = True
    for site, op in ops.items():
        if site in by_plan:
            stages[site] = by_plan[site]
        elif isinstance(getattr(op, "stage", None), int):
            stages[site] = int(op.stage)
        else:
            stages[site] = 0
            known = False
    return stages, known


# ---------------------------------------------------------------------------------------------- tune


def _check_alphas(alphas: Iterable[float] | None) -> list[float]:
    if (alphas is not None and not isinstance(alphas, Iterable)) or isinstance(alphas, (str, bytes)):
        raise EvaluationError(f"alphas must be a list of numbers to try, e.g. [0, 0.1, 0.2], not {alphas!r}")
    values = list(DEFAULT_ALPHAS if alphas is None else alphas)
    out = []
    for a in values:
        try:
            v = float(a)
        except (TypeError, ValueError) as e:
            raise EvaluationError(f"alpha {a!r} is not a number. Hint: e.g. alphas=[0, 0.1, 0.2]") from e
        if not (math.isfinite(v) and v >= 0):
            raise EvaluationError(f"alpha {a!r} must be a finite number >= 0")
        out.append(v)
    if not out:
        raise EvaluationError("no alpha to try. Hint: alphas=None sweeps 0 to 0.5 in steps of 0.05")
    return sorted(set(out) | {0.0})


def _refuse_test(data: Any) -> None:
    _, _, _, splits = data_bookkeeping(data)
    for split in ("test", "all"):  # 'all' holds the test samples too
        if split in splits:
            holds = "" if split == "test" else " (it holds the test samples)"
            raise DataError(
                f"refusing to tune on the {split!r} split{holds}: choosing alpha on test data makes the final "
                "evaluation optimistic. Hint: tune on the 'val' split (--split val; in Python "
                "load_dataset(source, split='val')) and evaluate on 'test'"
            )


def tune(
    model: nn.Module,
    val_data: Any,
    *,
    alphas: Iterable[float] | None = None,
    attack: str = "apgd-ce",
    eps: float = 8 / 255,
    norm: str = "Linf",
    n: int | None = None,
    batch_size: int = 128,
    max_clean_drop: float = 0.5,
    bpda: bool = False,
    per_stage: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    steps: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    attack_cache: Any = None,
) -> TuneResult:
    """Sweep α on validation data, choose it under a clean-accuracy bound and set it on ``model``.

    Args:
        model: a calibrated model with MeanSparse operators (a rewritten model, or hand-placed ops).
        val_data: the **validation** split (a graphsparse dataset, ``Subset``, ``DataLoader`` (read as
            given), an ``(x, y)`` pair of tensors or an iterable of ``(x, y)`` batches; samples and batches
            may be dicts). A graphsparse test (or ``all``) split is refused; data whose split cannot be told
            gives a :class:`SplitWarning`.
        alphas: the α values to try (0 is always added: it is the reference); default 0 to 0.5 step 0.05.
        attack: the attack (an AutoAttack component name, see :mod:`graphsparse.robust.evaluate`).
        eps, norm: threat model (ε in ``[0, 1]`` pixel units: 8/255, not 8).
        n: number of validation samples (deterministic pick by ``seed``); None for all.
        batch_size: batch size of attacks and clean passes.
        max_clean_drop: largest allowed clean-accuracy drop against α = 0, in percentage points.
        bpda: also attack with straight-through gradients and select on the worse of the two numbers.
        per_stage: after the global sweep, a coordinate search giving each stage its own α (stages from
            the rewrite plan, see :func:`site_stages`), starting from the global choice.
        seed: seed of the sample pick and of the attacks.
        device: where to run; default the model's device.
        steps: APGD iterations (None: AutoAttack's 100).
        progress: called as ``progress(done, total, label)`` with samples attacked so far (all ranks) and in
            all (α values × variants × samples; it grows when the per-stage search starts), after each attack
            chunk (label ``"alpha=0.2 bpda: 40 of 64 robust"``) and each measured α (label ``"alpha=0.2"``).
        input_key, label_key: the keys of inputs and labels when samples or batches are dicts
            (:func:`graphsparse.data.batch_parts`).
        attack_cache: a file (or :class:`graphsparse.robust.attack_cache.AttackCache`) keeping the original model's
            per-sample results (the α = 0 point) across runs and shared with :func:`graphsparse.evaluate`;
            None keeps them for this call only.

    Returns:
        A :class:`TuneResult`; the chosen α is set on ``model`` and, for a rewritten model, the result is
        stored as ``rewrite_info(model).records["tuning"]``. On error every α is restored.

    Raises:
        DataError: ``val_data`` is (part of) a test split.
        PlanError: the model has no MeanSparse operators.
        CalibrationError: no operator has statistics (calibrate first).
        EvaluationError: bad attack, norm, ε, n, α or bound; no α within the bound.
    """
    _refuse_test(val_data)
    eps, norm = check_threat(eps, norm)
    key = attack_key(attack)
    check_positive("batch_size", batch_size, allow_none=False)
    check_positive("steps", steps)
    values = _check_alphas(alphas)
    if not (isinstance(max_clean_drop, (int, float)) and math.isfinite(max_clean_drop) and max_clean_drop >= 0):
        raise EvaluationError(f"max_clean_drop must be a number >= 0 (percentage points), got {max_clean_drop!r}")
    ops = operators(model, types=(MeanSparse,))
    if not ops:
        raise PlanError(
            "the model has no MeanSparse operators, there is no alpha to tune. "
            "Hint: graphsparse.rewrite(model, rule, example_input) and calibrate first"
        )
    if all(float(op.var.abs().max()) == 0.0 for op in ops.values()):
        raise CalibrationError(
            "no MeanSparse operator has statistics (every variance is 0), so alpha has no effect. "
            "Hint: calibrate first (graphsparse calibrate ARTIFACT --data SOURCE; in Python "
            "graphsparse.calibrate(model, train_data))"
        )
    s = pick_samples(val_data, n, seed, input_key=input_key, label_key=label_key)
    check_radius(eps, norm, s)
    n_eval = int(s.x.shape[0])
    notes: list[str] = []
    if s.split is None:
        notes.append(
            "graphsparse: the data carries no split bookkeeping, so tuning cannot tell whether it is test data; "
            "choosing alpha on test samples makes their evaluation optimistic. Hint: tune on "
            "load_dataset(source, split='val'), or make sure this data is not the test set"
        )
    elif s.split != "val":
        notes.append(f"graphsparse: tuned on the {s.split!r} split; the validation split is 'val'")
    if s.split != "val":
        warnings.warn(notes[-1].removeprefix("graphsparse: "), SplitWarning, stacklevel=2)
    if s.split is not None and not len(s.indices):
        notes.append(UNKNOWN_INDICES)
    stages, stages_known = site_stages(model) if per_stage else ({}, True)
    if per_stage and not stages_known:
        notes.append("graphsparse: some operators have no stage (not from a rewrite plan); they share stage 0")
    saved = {site: op.alpha.detach().clone() for site, op in ops.items()}
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    variants = ("exact", "bpda") if bpda else ("exact",)
    per_config = len(variants) * n_eval  # samples attacked for one α configuration
    total = len(values)  # configurations
    done = 0  # samples attacked
    cache: dict[tuple[float, ...], tuple[float, float, float | None]] = {}
    sdigest = samples_digest(s)
    store = attack_cache if isinstance(attack_cache, AttackCache) else AttackCache(attack_cache)

    def measure(config: Mapping[str, float], label: str) -> tuple[float, float, float | None]:
        nonlocal done
        sig = tuple(config[site] for site in ops)
        if sig not in cache:
            set_alpha(model, dict(config))
            robust: dict[str, float] = {}
            for variant in variants:

                def chunk(_: str, seen: int, robust_now: int, finished: bool, variant: str = variant,
                          start: int = done) -> None:
                    if progress is not None and not finished:  # the other ranks attack as many samples alongside
                        now = start + min(n_eval, seen * rank_and_size()[1])
                        progress(now, total * per_config, f"{label} {variant}: {robust_now} of {seen} robust")

                with straight_through(model) if variant == "bpda" else contextlib.nullcontext():
                    flags, _, rows, msgs = measure_variant(
                        model, s, variant, [key], samples=sdigest, cache=store, eps=eps, norm=norm,
                        batch_size=batch_size, seed=seed, device=target, n_classes=n_classes, steps=steps,
                        progress=chunk,
                    )
                done += n_eval
                notes.extend(summarise(msgs[key], f"{label}/{variant}"))
                robust[variant] = pct(int(rows[key].sum()), n_eval)
            cache[sig] = (pct(int(flags.sum()), n_eval), robust["exact"], robust.get("bpda"))
        else:
            done += per_config  # measured before: nothing attacked
        if progress is not None:
            progress(done, total * per_config, label)
        return cache[sig]

    curve: list[TunePoint] = []
    stage_curve: list[TunePoint] = []
    stage_alphas: dict[int, float] = {}
    try:
        if target != home:
            model.to(target)
        with eval_mode(model), logits_output(model):
            n_classes = model_classes(model, s, target)
            check_classes([key], n_classes)
            for a in values:
                clean, robust, robust_b = measure(dict.fromkeys(ops, a), f"alpha={a:g}")
                curve.append(TunePoint(a, clean, robust, robust_b))
            best = select_alpha(curve, max_clean_drop=max_clean_drop)
            baseline = curve[0].clean
            config = dict.fromkeys(ops, best.alpha)
            if per_stage:
                order = sorted(set(stages.values()))
                total += len(order) * len(values)
                for stage in order:
                    members = [site for site in ops if stages[site] == stage]
                    rows = []
                    for a in values:
                        trial = dict(config, **dict.fromkeys(members, a))
                        clean, robust, robust_b = measure(trial, f"stage {stage} alpha={a:g}")
                        rows.append(TunePoint(a, clean, robust, robust_b, stage=stage))
                    stage_curve.extend(rows)
                    pick = select_alpha(
                        rows, max_clean_drop=max_clean_drop, baseline_clean=baseline, reference_alpha=config[members[0]]
                    )
                    stage_alphas[stage] = pick.alpha
                    config.update(dict.fromkeys(members, pick.alpha))
    except BaseException:
        with torch.no_grad():
            for site, op in ops.items():
                op.alpha.copy_(saved[site])
        raise
    finally:
        if target != home:
            model.to(home)
    set_alpha(model, config)
    result = TuneResult(
        curve=curve,
        chosen_alpha=best.alpha,
        baseline_clean=baseline,
        max_clean_drop=float(max_clean_drop),
        criterion="min(robust, robust_bpda)" if bpda else "robust",
        attack=key,
        eps=eps,
        norm=norm,
        n=n_eval,
        seed=seed,
        batch_size=batch_size,
        steps=steps,
        split=s.split,
        source=s.source,
        indices=[int(i) for i in s.indices],
        stage_curve=stage_curve,
        stage_alphas=stage_alphas,
        site_alphas={site: float(v) for site, v in config.items()},
        warnings=notes,
        date=utc_now(),
        stats_sha256=stats_digest(model),
    )
    store_record(model, "tuning", result.to_dict())
    return result
