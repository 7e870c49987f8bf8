"""Honest robustness evaluation: base model, exact gradient and straight-through (BPDA) side by side.

``evaluate(model, data)`` measures clean accuracy and the robust accuracy under each requested attack,
run through the real AutoAttack code (PyPI ``pyautoattack``), for three versions of the same model:

- ``base``: every MeanSparse α set to 0, which makes the operators exact identities, so this *is* the
  original model (α is restored afterwards);
- ``exact``: the rewritten model attacked with its true gradient (zero inside every blocked band);
- ``bpda``: the rewritten model attacked with an identity gradient through every MeanSparse
  (:func:`graphsparse.ops.straight_through`); the forward pass, and so every prediction, is unchanged.

MeanSparse has a zero gradient inside its band, so a gain of ``exact`` over ``base`` may only mean that
the attack lost its gradient. The report's :attr:`EvalReport.verdict` says plainly whether the gain holds
under BPDA or vanishes (gradient masking). AutoAttack's own check warnings (zero gradients, randomised
or dynamic defence, probabilities instead of logits, ...) are captured from its logger and from
``warnings`` and listed in :attr:`EvalReport.warnings`, together with graphsparse's own check: the share
of samples whose input gradient of the cross-entropy loss is exactly zero (AutoAttack only checks this
for its DLR losses). AutoAttack's checks of the forward pass (a randomised or dynamic defence) run once per
attack, on its first chunk, for base and exact (bpda has exact's forward pass); its clean pass and output-range
check of each chunk read the logits of evaluate's own clean pass instead of running the model again.

Attack names (``attacks=``): each entry is one evaluation.

- ``apgd-ce``, ``apgd-t``, ``apgd-dlr``, ``fab``, ``fab-t``, ``square``: that AutoAttack component alone
  (``version='custom'``), with the parameters of AutoAttack's ``standard`` version (1 restart, up to 9
  target classes);
- ``autoattack`` (alias ``standard``): the standard AutoAttack cascade
  (APGD-CE, APGD-T, FAB-T, Square); robust accuracy is the worst case over the four;
- a custom cascade: a list of component names, or the names joined by ``+`` (``"apgd-ce+apgd-t"``).

Accuracies are percentages (0–100) of the ``n`` evaluation samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from graphsparse.artifact.records import stats_digest, store_record, utc_now
from graphsparse.errors import EvaluationError, PlanError
from graphsparse.model_output import logits_output
from graphsparse.ops import MeanSparse, operators
from graphsparse.ops.state import eval_mode, model_device
from graphsparse.robust.attacks import VARIANTS, attack_key, check_classes, check_threat, import_autoattack, variant
from graphsparse.robust.eval_report import EvalReport, VariantResult, assess, pct, summarise
from graphsparse.robust.per_sample import PerSample, lead_sentence
from graphsparse.robust.samples import (
    UNKNOWN_INDICES,
    Samples,
    check_positive,
    check_radius,
    model_classes,
    pick_samples,
)

__all__ = ["EvalReport", "VariantResult", "evaluate"]


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    attacks: Iterable[str | Sequence[str]] = ("apgd-ce",),
    eps: float = 8 / 255,
    norm: str = "Linf",
    n: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    base_alpha_zero: bool = True,
    steps: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    cache: Any = None,
    state: str | os.PathLike[str] | None = None,
) -> EvalReport:
    """Clean and robust accuracy of ``model`` as base (α = 0), exact-gradient and BPDA variants.

    The model's α, backward modes, train/eval modes and device are restored on exit, also on error; the
    global torch random state is left as it was. Results are deterministic for a seed. When ``model``
    was made by :func:`graphsparse.rewrite`, the report is also stored as
    ``rewrite_info(model).records["evaluation"]``.

    Args:
        model: a rewritten model (MeanSparse operators inside) taking ``[0, 1]`` pixels.
        data: the **test** split: a dataset of ``(x, y)``, a DataLoader (read as given, sampler and
            ``collate_fn`` included), an ``(x, y)`` pair of tensors or an iterable of ``(x, y)`` batches;
            samples and batches may be dicts.
        attacks: attack entries (see the module docstring): ``apgd-ce``, ``apgd-t``, ``autoattack``, a
            list of components for a custom cascade.
        eps: radius of the threat model (in ``[0, 1]`` pixel units: 8/255, not 8; an L∞ ε of 1 or more is
            refused).
        norm: ``Linf`` or ``L2`` (``L1`` is passed through to AutoAttack too).
        n: number of samples, picked deterministically by ``seed``; ``None`` for all.
        batch_size: batch size of the attacks and of the clean pass.
        seed: seed of the sample pick and of AutoAttack's random starts.
        device: where to evaluate; default the model's device.
        base_alpha_zero: measure the base model as the model with every α = 0; ``False`` skips it
            (e.g. for operators that have no identity setting).
        steps: iterations of APGD/APGD-T/FAB; ``None`` keeps AutoAttack's 100 (a smaller number makes a
            weaker, cheaper attack: use it for tests and quick looks only).
        progress: called as ``progress(done, total, label)`` after each attack chunk and attack run, counting
            samples attacked over all variants and attacks (``label``: variant, attack, robust so far).
        input_key, label_key: the keys of inputs and labels when samples or batches are dicts (default the
            first present of ``image``/``pixel_values``/... and ``label``/``labels``/...;
            :func:`graphsparse.data.batch_parts`).
        cache: a file (or :class:`graphsparse.robust.attack_cache.AttackCache`) keeping the original model's
            per-sample results across runs; None keeps them for this call only.
        state: a file where every finished attack chunk is saved; a rerun with the same arguments resumes
            from it (:mod:`graphsparse.robust.eval_state`); removed when the evaluation finishes.

    Attacks run in chunks of ``batch_size`` samples (:mod:`graphsparse.robust.attack_cache`), so a sample's outcome
    does not depend on the other chunks.

    Returns:
        An :class:`EvalReport`.

    Raises:
        EvaluationError: unknown attack or norm, bad ε/n/batch size, empty data, inputs outside
            ``[0, 1]``, pyautoattack not installed.
    """
    eps, norm = check_threat(eps, norm)
    check_positive("batch_size", batch_size, allow_none=False)
    check_positive("steps", steps)
    if isinstance(attacks, str):
        attacks = [attacks]
    if not isinstance(attacks, Iterable):
        raise EvaluationError(f"attacks must be a list of attack names, e.g. ['apgd-ce'], not {attacks!r}")
    entries = list(attacks)
    if not entries:
        raise EvaluationError("no attack to run. Hint: attacks=('apgd-ce',) or ('autoattack',)")
    keys = [attack_key(a) for a in entries]
    if len(set(keys)) != len(keys):
        raise EvaluationError(f"attack list {keys} names an attack twice. Hint: name each one once")
    import_autoattack()
    s = pick_samples(data, n, seed, input_key=input_key, label_key=label_key)
    check_radius(eps, norm, s)
    n_eval = int(s.x.shape[0])
    ops = operators(model, types=(MeanSparse,))
    alphas = {site: float(op.alpha) for site, op in ops.items()}
    digest = stats_digest(model)
    messages: list[str] = []
    if not ops:
        messages.append("graphsparse: the model has no MeanSparse operators; base, exact and bpda are the same model")
    from graphsparse.graph.tracer import operator_types

    others = [site for site in operators(model, types=operator_types()) if site not in ops]
    if others and base_alpha_zero:
        messages.append(
            f"graphsparse: {len(others)} operators are not MeanSparse (e.g. {others[0]!r}) and stay in the 'base' "
            "model, which is therefore not the original model"
        )
    if s.split is not None and s.split != "test":
        messages.append(f"graphsparse: evaluated on the {s.split!r} split; report numbers on the 'test' split")
    if s.split is not None and not len(s.indices):
        messages.append(UNKNOWN_INDICES)
    tuned = _tuned_on(model, s)
    if tuned:
        messages.append(
            f"graphsparse: {tuned} of the {n_eval} evaluated samples of {s.source} were used to tune alpha; these "
            "numbers are optimistic. Hint: evaluate on the 'test' split, with the split seed used for tuning"
        )
    from graphsparse.distributed import rank_and_size
    from graphsparse.robust.attack_cache import (
        AttackCache,
        measure_variant,
        model_digest,
        samples_digest,
    )
    from graphsparse.robust.eval_state import EvalState

    variants = [v for v in VARIANTS if v != "base" or base_alpha_zero]
    total = len(variants) * len(keys) * n_eval  # samples to attack, over every variant and attack
    done = 0
    home = model_device(model)
    target = torch.device(device) if device is not None else home
    sdigest = samples_digest(s)
    store = cache if isinstance(cache, AttackCache) else AttackCache(cache)
    settings = {"eps": eps, "norm": norm, "seed": seed, "steps": steps, "batch_size": batch_size}
    saved = None
    if state is not None:
        rank, world_size = rank_and_size()  # each rank keeps its own chunks
        path = state if world_size == 1 else f"{os.fspath(state)}.rank{rank}-of-{world_size}"
        args = {"model": model_digest(model, without_meansparse=False), "samples": sdigest, "attacks": keys}
        saved = EvalState(path, dict(args, variants=variants, device=target.type, world_size=world_size, **settings))

    def step(label: str, seen: int, robust: int, finished: bool) -> None:
        nonlocal done
        if finished:
            done += n_eval
        if progress is not None:  # the other ranks attack as many samples alongside
            now = done if finished else done + min(n_eval, seen * rank_and_size()[1])
            progress(now, total, f"{label}: {robust} of {seen} robust")

    results: dict[str, VariantResult] = {}
    flags = PerSample()
    try:
        if target != home:
            model.to(target)
        with eval_mode(model), logits_output(model):
            n_classes = model_classes(model, s, target)
            check_classes(entries, n_classes)
            for v in variants:
                with variant(model, v):
                    clean, zero, robust, msgs = measure_variant(
                        model, s, v, entries, samples=sdigest, cache=store, state=saved, device=target,
                        n_classes=n_classes, progress=step, **settings,
                    )
                if zero:
                    messages.append(
                        f"{v}: graphsparse: {zero} of {n_eval} samples have an all-zero input gradient of "
                        "the cross-entropy loss; gradient attacks cannot start from them"
                        + (" (gradient masking; compare with bpda)" if v == "exact" and ops else "")
                    )
                r = VariantResult(clean=pct(int(clean.sum()), n_eval), zero_gradient=pct(zero, n_eval))
                for key in keys:
                    r.robust[key] = pct(int(robust[key].sum()), n_eval)
                    messages.extend(summarise(msgs[key], f"{v}/{key}"))
                results[v] = r
                flags.clean[v], flags.robust[v] = clean, robust
    finally:
        if target != home:
            model.to(home)
    where = s.indices if len(s.indices) == n_eval else s.positions
    worst = {a: pct(int(flags.worst_case(a).sum()), n_eval) for a in keys}
    masked = {a: flags.masked(a, where) for a in keys}
    parts = {"base": results.get("base"), "exact": results["exact"], "bpda": results["bpda"], "attacks": keys}
    gains, masking, verdict = assess(parts, n_eval)
    masking = masking or any(masked.values())
    report = EvalReport(
        base=results.get("base"),
        exact=results["exact"],
        bpda=results["bpda"],
        attacks=keys,
        n=n_eval,
        eps=eps,
        norm=norm,
        seed=seed,
        batch_size=batch_size,
        steps=steps,
        split=s.split,
        source=s.source,
        indices=[int(i) for i in s.indices],
        alphas=alphas,
        warnings=messages,
        gains=gains,
        gradient_masking=masking,
        verdict=f"{lead_sentence(worst, masked, n_eval)} {verdict}",
        date=utc_now(),
        stats_sha256=digest,
        worst_case=worst,
        masked_samples=masked,
        per_sample=flags,
    )
    store_record(model, "evaluation", report.to_dict())
    if saved is not None:
        saved.finish()
    return report


def _tuned_on(model: nn.Module, s: Samples) -> int:
    """How many of ``s`` (by source index) the model's tuning record says were used to choose α."""
    from graphsparse.planning.rewrite import rewrite_info

    try:
        record = rewrite_info(model).records.get("tuning") or {}
    except PlanError:  # not a rewritten model: no record
        return 0
    if not s.source or record.get("source") != s.source:
        return 0
    return len(set(int(i) for i in s.indices) & set(int(i) for i in record.get("indices", ())))
