"""The report of :func:`graphsparse.evaluate`: numbers per variant, the verdict, per-sample records.

Moved out of :mod:`graphsparse.robust.evaluate` (which re-exports :class:`EvalReport` and :class:`VariantResult`),
with the formatting helpers the reports of evaluate and tune share (:func:`pct`, :func:`summarise`, :func:`assess`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from graphsparse.errors import closest
from graphsparse.robust.per_sample import PerSample

__all__ = ["EvalReport", "VariantResult", "assess", "pct", "summarise"]


@dataclass
class VariantResult:
    """Numbers of one model variant.

    Attributes:
        clean: clean accuracy (%).
        robust: attack key -> robust accuracy (%).
        zero_gradient: share (%) of samples whose cross-entropy input gradient is exactly zero.
    """

    clean: float
    robust: dict[str, float] = field(default_factory=dict)
    zero_gradient: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"clean": self.clean, "robust": dict(self.robust), "zero_gradient": self.zero_gradient}


@dataclass
class EvalReport:
    """The result of :func:`evaluate`; :meth:`to_dict` is JSON-able.

    Attributes:
        base: the model with every MeanSparse α = 0 (the original model); ``None`` when not measured.
        exact: the rewritten model attacked with its true gradient.
        bpda: the rewritten model attacked with straight-through gradients through MeanSparse.
        attacks: attack keys, in the order run.
        n: number of evaluation samples.
        eps, norm, seed, batch_size, steps: the attack settings (``steps`` None: AutoAttack's defaults).
        split, source: where the samples came from (``split`` None when the data carries no bookkeeping).
        indices: source indices of the samples.
        alphas: site id -> α of the evaluated model.
        warnings: AutoAttack's check warnings and graphsparse's own, each prefixed by variant and attack.
        gains: attack -> {"exact", "bpda"}: robust-accuracy gain over ``base`` in percentage points.
        gradient_masking: the gain of ``exact`` over ``base`` vanishes or shrinks under BPDA for some attack.
        verdict: one plain sentence per attack.
        date: ISO 8601 UTC time at which the evaluation finished.
        stats_sha256: digest of the operators' statistics it was made with
            (:func:`graphsparse.artifact.records.stats_digest`).
        worst_case: attack -> robust accuracy (%) per sample over exact and BPDA: a sample counts only if
            neither attack broke it (at most the smaller of the two aggregate figures; the honest number).
        masked_samples: attack -> source indices (positions when unknown) of the samples the exact-gradient
            attack failed on but BPDA broke: gradient masking, sample by sample.
        per_sample: clean and robust flags of every sample, per variant and attack
            (:class:`graphsparse.robust.per_sample.PerSample`; packed bits in :meth:`to_dict`).
    """

    base: VariantResult | None
    exact: VariantResult
    bpda: VariantResult
    attacks: list[str]
    n: int
    eps: float
    norm: str
    seed: int
    batch_size: int
    steps: int | None
    split: str | None
    source: str
    indices: list[int]
    alphas: dict[str, float]
    warnings: list[str]
    gains: dict[str, dict[str, float]]
    gradient_masking: bool
    verdict: str
    date: str = ""
    stats_sha256: str = ""
    worst_case: dict[str, float] = field(default_factory=dict)
    masked_samples: dict[str, list[int]] = field(default_factory=dict)
    per_sample: PerSample = field(default_factory=PerSample)

    def variant(self, name: str) -> VariantResult | None:
        """The result of variant ``base``, ``exact`` or ``bpda``."""
        from graphsparse.robust.attacks import VARIANTS

        if name not in VARIANTS:
            raise KeyError(f"unknown variant {name!r}{closest(name, VARIANTS)}")
        return getattr(self, name)

    def honest(self, attack: str) -> float:
        """Robust accuracy of the rewritten model under ``attack``: per sample, the worse of exact and BPDA."""
        from graphsparse.robust.attacks import attack_key

        key = attack_key(attack)
        return self.worst_case.get(key, min(self.exact.robust[key], self.bpda.robust[key]))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: ``base``/``exact``/``bpda`` (clean, robust per attack), settings, verdict."""
        return {
            "base": None if self.base is None else self.base.to_dict(),
            "exact": self.exact.to_dict(),
            "bpda": self.bpda.to_dict(),
            "attacks": list(self.attacks),
            "n": self.n,
            "eps": self.eps,
            "norm": self.norm,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "split": self.split,
            "source": self.source,
            "indices": list(self.indices),
            "alphas": dict(self.alphas),
            "warnings": list(self.warnings),
            "gains": {k: dict(v) for k, v in self.gains.items()},
            "gradient_masking": self.gradient_masking,
            "verdict": self.verdict,
            "date": self.date,
            "stats_sha256": self.stats_sha256,
            "worst_case": dict(self.worst_case),
            "masked_samples": {k: list(v) for k, v in self.masked_samples.items()},
            "per_sample": self.per_sample.to_dict(),
        }


def pct(count: int, n: int) -> float:
    """``count`` of ``n`` samples as a percentage, rounded to 6 decimals."""
    return round(100.0 * count / n, 6)


def assess(report_parts: dict[str, Any], n: int) -> tuple[dict[str, dict[str, float]], bool, str]:
    """``(gains, gradient_masking, verdict)`` of a report's ``base``/``exact``/``bpda`` results over ``attacks``."""
    base: VariantResult | None = report_parts["base"]
    exact: VariantResult = report_parts["exact"]
    bpda: VariantResult = report_parts["bpda"]
    attacks: list[str] = report_parts["attacks"]
    if base is None:
        sentences = []
        masking = False
        for a in attacks:
            if bpda.robust[a] < exact.robust[a]:
                masking = True
                sentences.append(
                    f"{a}: BPDA lowers robust accuracy from {exact.robust[a]:.2f}% to {bpda.robust[a]:.2f}% "
                    "(the exact-gradient number overstates robustness; no base model was measured)."
                )
            else:
                sentences.append(f"{a}: BPDA does not lower robust accuracy ({bpda.robust[a]:.2f}%).")
        return {}, masking, " ".join(sentences)
    gains: dict[str, dict[str, float]] = {}
    sentences = []
    masking = False
    one = 100.0 / n
    for a in attacks:
        ge = round(exact.robust[a] - base.robust[a], 6)
        gb = round(bpda.robust[a] - base.robust[a], 6)
        gains[a] = {"exact": ge, "bpda": gb}
        nums = f"base {base.robust[a]:.2f}%, exact {exact.robust[a]:.2f}%, BPDA {bpda.robust[a]:.2f}%"
        if ge <= 0:
            worse = " and BPDA puts it below the base model" if gb < 0 else ""
            sentences.append(f"{a}: no robustness gain over the base model ({nums}){worse}.")
            if gb < ge:
                masking = True
        elif gb <= 0:
            masking = True
            how = "reverses" if gb < 0 else "vanishes"
            sentences.append(
                f"gradient masking: {a}: the +{ge:.2f} pp gain over the base model {how} under BPDA "
                f"({gb:+.2f} pp; {nums})."
            )
        elif gb < ge:
            masking = True
            sentences.append(
                f"partial gradient masking: {a}: the gain over the base model shrinks from +{ge:.2f} pp "
                f"to +{gb:.2f} pp under BPDA ({nums})."
            )
        else:
            sentences.append(f"{a}: the +{gb:.2f} pp gain over the base model holds under BPDA ({nums}).")
    sentences.append(f"(n = {n}; one sample = {one:.2f} pp)")
    return gains, masking, " ".join(sentences)


def summarise(messages: list[str], where: str) -> list[str]:
    """One line per distinct message, in first-seen order, with a repeat count."""
    counts: OrderedDict[str, int] = OrderedDict()
    for m in messages:
        counts[m] = counts.get(m, 0) + 1
    out = []
    for m, c in counts.items():
        out.append(f"{where}: {m}" + (f" (x{c})" if c > 1 else ""))
    return out
