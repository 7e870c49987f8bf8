"""The demo: the whole pipeline on the shipped demo model and MNIST-5k, in a few minutes on 2 CPU cores.

inspect → rewrite (``after_addition``) → calibrate (train split) → tune α (val split) → evaluate (test split:
clean, APGD-CE, an AutoAttack subset; exact and BPDA) → save the artifact and the α-curve PNG.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoSettings", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run (``fast`` is the reduced setting CI runs)."""

    rule: str = "after_addition"
    alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    tune_n: int = 128
    eval_n: int = 200
    steps: int = 10
    attacks: tuple[str, ...] = ("apgd-ce", "apgd-ce+apgd-dlr")
    max_clean_drop: float = 0.5
    batch_size: int = 250

    @classmethod
    def fast(cls) -> DemoSettings:
        return cls(alphas=(0.0, 0.1, 0.2, 0.3), tune_n=64, eval_n=64, steps=5, attacks=("apgd-ce",))


@dataclass
class DemoResult:
    """What the demo produced: figures and where the files are."""

    sites: dict[str, int]
    rewritten: int
    calibration: dict[str, Any]
    chosen_alpha: float
    tuning_rows: list[dict[str, Any]]
    evaluation: dict[str, Any]
    artifact: Path
    curve_png: Path
    curve_csv: Path
    eps: float
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(
    output_dir: str | Path = "graphsparse-demo",
    *,
    fast: bool = False,
    settings: DemoSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole pipeline on the demo model; write the artifact and the α curve into ``output_dir``.

    Args:
        output_dir: folder for ``demo.after_addition.safetensors``, ``tuning.png``/``.csv``/``.json``.
        fast: the reduced setting (fewer α, samples and attack steps).
        settings: explicit sizes (overrides ``fast``).
        log: receives one line per stage (the library itself never prints).
    """
    import time

    from graphsparse.artifact.io import save
    from graphsparse.data import load_dataset, make_loader
    from graphsparse.demo.models import demo_model_info, load_demo_model
    from graphsparse.graph.capture import capture
    from graphsparse.graph.sites import sites_of_capture
    from graphsparse.planning.fuse import fuse_activations
    from graphsparse.planning.plan import make_plan
    from graphsparse.planning.rewrite import apply_plan
    from graphsparse.plots import plot_tuning
    from graphsparse.robust.evaluate import evaluate
    from graphsparse.robust.tune import tune
    from graphsparse.sources.recipes import Recipe
    from graphsparse.stats.calibrate import calibrate

    cfg = settings or (DemoSettings.fast() if fast else DemoSettings())
    say = log or (lambda _line: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    model = load_demo_model()
    eps = float(demo_model_info().get("settings", {}).get("eps", 0.2))
    x = torch.zeros(1, 1, 28, 28)
    cap = capture(model, x, copy=True)
    sites = sites_of_capture(cap)
    roles = Counter(s.role for s in sites)
    say(f"inspect: {len(sites)} sites (" + ", ".join(f"{n} {r}" for r, n in roles.items()) + ")")

    plan = make_plan(sites, cfg.rule)
    recipe = Recipe("class", "graphsparse.demo.models:DemoPreActResNet")
    rewritten = apply_plan(cap, plan, sites=sites, input_shape=tuple(x.shape), recipe=recipe.to_json())
    say(f"rewrite: {len(plan.selected())} MeanSparse operators with rule {cfg.rule!r}")
    seconds["inspect+rewrite"] = time.perf_counter() - t

    t = time.perf_counter()
    train = load_dataset("mnist5k", split="train")
    record = calibrate(rewritten, make_loader(train, cfg.batch_size))
    say(f"calibrate: {record.samples} samples of {record.source}")
    seconds["calibrate"] = time.perf_counter() - t
    fuse_activations(rewritten)  # tuning and evaluation: the same outputs and gradients, in fewer memory passes

    t = time.perf_counter()
    val = load_dataset("mnist5k", split="val")
    result = tune(rewritten, val, alphas=list(cfg.alphas), attack="apgd-ce", eps=eps, n=cfg.tune_n,
                  batch_size=cfg.batch_size, max_clean_drop=cfg.max_clean_drop, steps=cfg.steps,
                  bpda=True)  # the curve shows whether a gain survives the adaptive (BPDA) attack
    curve_png = plot_tuning(result, out / "tuning.png")
    curve_csv = result.to_csv(out / "tuning.csv")
    result.to_json(out / "tuning.json")
    say(f"tune: α = {result.chosen_alpha:g} on {result.n} validation samples ({len(result.curve)} values of α)")
    seconds["tune"] = time.perf_counter() - t

    t = time.perf_counter()
    test = load_dataset("mnist5k", split="test")
    report = evaluate(rewritten, test, attacks=list(cfg.attacks), eps=eps, n=cfg.eval_n,
                      batch_size=cfg.batch_size, steps=cfg.steps)
    say(f"evaluate: {report.n} test samples, L∞ ε = {eps:g}")
    seconds["evaluate"] = time.perf_counter() - t

    artifact = save(rewritten, out / f"demo.{cfg.rule}.safetensors")
    return DemoResult(
        sites=dict(roles), rewritten=len(plan.selected()), calibration=record.to_dict(),
        chosen_alpha=result.chosen_alpha, tuning_rows=result.rows(), evaluation=report.to_dict(),
        artifact=artifact, curve_png=curve_png, curve_csv=curve_csv, eps=eps, seconds=seconds,
    )
