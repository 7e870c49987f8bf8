"""Zoo coverage: one model per timm family (and RobustBench architectures) through capture + site discovery.

For each model: did it trace (root / fallback / failed), activation recall against forward hooks on the
eager model (every activation module that actually runs), output equivalence of the captured model, and
capture + site-analysis time. Prints a table and a summary line; ``--json FILE`` writes the rows.

    python tools/zoo_coverage.py                  # every timm family (~10-20 min on 2 cores), then the rest
    python tools/zoo_coverage.py --families resnet,convnext --timing
    python tools/zoo_coverage.py --sections torchvision,huggingface   # torchvision and Hugging Face only
    python tools/zoo_coverage.py --timing-only    # resnet50 / convnext_large / swin_large timings

Sections: ``timm`` (one model per family), ``robustbench`` (three architectures), ``torchvision`` (one or two
classification builders per family of ``torchvision.models.list_models``, random init, 224², inception 299²)
and ``huggingface`` (the 18 ``transformers`` vision families of
``graphsparse.testing.architectures.huggingface_classifiers``: small random configs). *missed* counts the
activation places capture's own census saw run but no site reaches (the ``PartialCaptureWarning``).

``--timing`` times capture + site analysis against a plain ``torch.fx.symbolic_trace`` + ``ShapeProp`` of
the same model, side by side in this process (median of 3 after a warm-up), excluding model construction.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import timm
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphsparse.graph.activations import activation_kind_of_module, is_gate_kind  # noqa: E402
from graphsparse.graph.capture import PartialCaptureWarning, capture  # noqa: E402
from graphsparse.graph.sites import sites_of_capture  # noqa: E402

_PREFER = (
    "test_",
    "_atto",
    "_femto",
    "_pico",
    "_nano",
    "_tiny",
    "_xxs",
    "_xs",
    "_small",
    "_s",
    "_b0",
    "18",
    "_050",
)
_MAX_SIDE = 256


def candidates(module: str) -> list[str]:
    """The family's models, the smallest-looking first."""
    names = timm.list_models(module=module)
    ranked = []
    for key in _PREFER:
        ranked += sorted((n for n in names if key in n and n not in ranked), key=len)
    return ranked + sorted((n for n in names if n not in ranked), key=len)


def build_first(module: str, tries: int = 4) -> tuple[str, torch.nn.Module] | None:
    """The first candidate of the family that builds here (some need arguments at their defaults)."""
    error = None
    for name in candidates(module)[:tries]:
        try:
            return name, timm.create_model(name).eval()
        except Exception as exc:  # a model that cannot be built with defaults: try the next one
            error = exc
    if error is not None:
        raise error
    return None


def input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    fixed = cfg.get("fixed_input_size", False)
    if not fixed and max(h, w) > _MAX_SIDE:
        h, w = min(h, _MAX_SIDE), min(w, _MAX_SIDE)
        patch = next((m.patch_size for m in model.modules() if getattr(m, "patch_size", None)), None)
        if patch:  # the capped side must stay a multiple of the patch (deepseek_vit: 14)
            p = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
            h, w = h // p * p, w // p * p
    return (1, c, h, w)


def ground_truth(model: torch.nn.Module, x: torch.Tensor) -> set[str]:
    ran: set[str] = set()
    handles = []
    for path, mod in model.named_modules():
        kind = activation_kind_of_module(mod)
        if kind is not None and not is_gate_kind(kind):
            handles.append(mod.register_forward_hook(lambda m, i, o, p=path: ran.add(p)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ran


def check(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict:
    row: dict = {
        "model": name,
        "traced": "failed",
        "recall": None,
        "equal": False,
        "seconds": None,
        "sites": 0,
        "opaque": 0,
        "reason": "",
    }
    truth = ground_truth(model, x)
    t0 = time.perf_counter()
    try:
        cap = capture(model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PartialCaptureWarning)  # counted in the row's `missed`
            sites = sites_of_capture(cap)
    except Exception as exc:
        row["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["traced"] = "root" if "" in cap.graphs else "fallback"
    row["equal"] = cap.max_abs_diff == 0.0
    row["max_abs_diff"] = cap.max_abs_diff
    row["sites"] = len(sites)
    row["opaque"] = len(cap.opaque)
    row["missed"] = len(sites.missed)
    found = {s.module for s in sites if s.op != "add"}
    missing = sorted(truth - found)
    row["recall"] = 1.0 if not truth else round(1 - len(missing) / len(truth), 4)
    if missing:
        row["reason"] = f"missed {len(missing)}: {', '.join(missing[:3])}"
    elif sites.missed:
        row["reason"] = f"census: {'; '.join(sites.missed[:2])}"
    elif not row["equal"]:
        row["reason"] = f"max |diff| {cap.max_abs_diff:.2g}"
    return row


def timing(names: list[str], repeats: int = 3) -> list[dict]:
    rows = []
    for name in names:
        model = timm.create_model(name).eval()
        x = torch.randn(*input_shape(model))

        def plain(model=model, x=x):
            gm = fx.symbolic_trace(model)
            with torch.no_grad():
                ShapeProp(gm).propagate(x)

        def ours(model=model, x=x):
            sites_of_capture(capture(model, x, check=False))

        def ours_checked(model=model, x=x):
            sites_of_capture(capture(model, x))

        row = {"model": name}
        for label, fn in (
            ("plain_fx_shapeprop", plain),
            ("graphsparse", ours),
            ("graphsparse_checked", ours_checked),
        ):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            row[label] = round(statistics.median(ts), 3)
        row["ratio"] = round(row["graphsparse"] / row["plain_fx_shapeprop"], 2)
        rows.append(row)
        print(
            f"{name:32s} plain fx+ShapeProp {row['plain_fx_shapeprop']:.3f}s  "
            f"graphsparse {row['graphsparse']:.3f}s "
            f"(with equivalence check {row['graphsparse_checked']:.3f}s)  ratio {row['ratio']:.2f}",
            flush=True,
        )
    return rows


def robustbench_models() -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    try:
        from graphsparse.sources.robustbench import import_robustbench

        import_robustbench()
        from robustbench.model_zoo.architectures import dm_wide_resnet as dm
        from robustbench.model_zoo.architectures import robustarch_wide_resnet as ra
    except Exception as exc:  # robustbench is optional here
        print(f"(robustbench architectures skipped: {exc})")
        return []
    cifar = (1, 3, 32, 32)
    return [
        (
            "robustbench:DMWideResNet-28-10-Swish",
            dm.DMWideResNet(depth=28, width=10, activation_fn=dm.Swish),
            cifar,
        ),
        (
            "robustbench:DMPreActResNet-18-SiLU",
            dm.DMPreActResNet(depth=18, width=0, activation_fn=torch.nn.SiLU, use_cuda=False),
            cifar,
        ),
        (
            "robustbench:RaWideResNet-small-SE",
            ra.NormalizedWideResNet(
                mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25),
                stem_width=16,
                depth=(2, 2, 2),
                stage_width=(32, 64, 128),
                groups=(1, 1, 1),
                activation_fn=torch.nn.SiLU,
                se_ratio=0.25,
                se_activation=torch.nn.ReLU,
                se_order=2,
            ),
            cifar,
        ),
    ]


# one or two builders per torchvision.models family (list_models(module=torchvision.models)): the smallest,
# and a second where the family holds another block design (SE, v2, grouped, batch-norm)
TORCHVISION = (
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t",
    "swin_v2_t", "vgg11_bn", "vit_b_16", "wide_resnet50_2",
)


def torchvision_models() -> list[tuple[str, str, object, tuple[int, ...]]]:
    """(family, name, build, input shape) of the torchvision section."""
    import torchvision

    jobs = []
    for name in TORCHVISION:
        family = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        shape = (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)
        build = functools.partial(_torchvision_model, name)
        jobs.append((family, f"torchvision:{name}", build, shape))
    return jobs


def _torchvision_model(name: str) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def huggingface_models() -> list[tuple[str, str, object, tuple[int, ...]]]:
    """(family, name, build, input shape) of the Hugging Face section."""
    try:
        import transformers
    except ImportError:
        print("(Hugging Face section skipped: transformers is not installed; pip install -e '.[transformers]')")
        return []
    from graphsparse.testing.architectures import huggingface_classifiers

    return [
        (family, f"transformers {transformers.__version__}:{family}", build, shape)
        for family, (build, shape) in huggingface_classifiers().items()
    ]


def run_section(title: str, jobs: list, rows: list[dict]) -> None:
    """Build and check every job of a section, printing rows as they come."""
    print(f"\n## {title}")
    _print_header()
    for family, name, build, shape in jobs:
        torch.manual_seed(0)
        try:
            row = check(name, build(), torch.randn(*shape))
        except Exception as exc:  # a model that cannot be built here
            row = {"model": name, "traced": "build-failed", "recall": None, "equal": False, "seconds": None,
                   "sites": 0, "reason": f"{type(exc).__name__}: {str(exc)[:120]}"}
        row["family"] = family
        row["section"] = title
        rows.append(row)
        _print_row(row)


def _print_header() -> None:
    print(
        f"{'family':24s} {'model':40s} {'traced':8s} {'recall':>6s} {'equal':5s} {'secs':>6s} "
        f"{'sites':>5s} {'missed':>6s}  reason"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="", help="comma-separated timm module names (default: all)")
    ap.add_argument("--json", default="", help="write rows to this JSON file")
    ap.add_argument("--timing", action="store_true", help="also time resnet50, convnext_large, swin_large")
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument(
        "--sections", default="timm,robustbench,torchvision,huggingface",
        help="comma-separated sections to run: timm, robustbench, torchvision, huggingface",
    )
    ap.add_argument("--timing-models", default="resnet50,convnext_large,swin_large_patch4_window7_224")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict] = []
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not args.timing_only:
        families = [f for f in args.families.split(",") if f] or sorted(timm.list_modules())
        jobs = [(fam, candidates(fam)[0]) for fam in families if candidates(fam)] if "timm" in sections else []
        if jobs:
            print("## timm")
            _print_header()
        for fam, name in jobs:
            try:
                name, model = build_first(fam)
                x = torch.randn(*input_shape(model))
                row = check(name, model, x)
            except Exception as exc:
                row = {
                    "model": name,
                    "traced": "build-failed",
                    "recall": None,
                    "equal": False,
                    "seconds": None,
                    "sites": 0,
                    "reason": f"{type(exc).__name__}: {str(exc)[:120]}",
                }
                if "-v" in sys.argv:
                    traceback.print_exc()
            row["family"] = fam
            row["section"] = "timm"
            rows.append(row)
            _print_row(row)
        if "robustbench" in sections:
            run_section("robustbench", [("robustbench", n, (lambda m=m: m), shape)
                                        for n, m, shape in robustbench_models()], rows)
        if "torchvision" in sections:
            run_section("torchvision", torchvision_models(), rows)
        if "huggingface" in sections:
            run_section("huggingface", huggingface_models(), rows)
        print()
        for section in dict.fromkeys(r["section"] for r in rows):
            _summary(section, [r for r in rows if r["section"] == section])
        built = [r for r in rows if r["traced"] != "build-failed"]
        full = [r for r in built if r["recall"] == 1.0 and r["equal"] and not r.get("missed")]
        misses = [r for r in built if r not in full]
        if misses:
            print("not fully covered:")
            for r in misses:
                print(f"  {r['family']} ({r['model']}): {r['traced']}, recall {r['recall']}, {r['reason']}")
    timing_rows = (
        timing(args.timing_models.split(","))
        if (args.timing or args.timing_only)
        else []
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "timing": timing_rows}, indent=1))


def _summary(section: str, rows: list[dict]) -> None:
    built = [r for r in rows if r["traced"] != "build-failed"]
    full = [r for r in built if r["recall"] == 1.0 and r["equal"] and not r.get("missed")]
    print(
        f"summary {section}: {len(full)}/{len(built)} fully covered "
        f"({100 * len(full) / max(1, len(built)):.1f} %: recall 100 %, nothing missed, outputs equal); "
        f"{sum(r['traced'] == 'fallback' for r in built)} by fallback; "
        f"{sum(r['traced'] == 'failed' for r in built)} failed; "
        f"{len(rows) - len(built)} could not be built here"
    )


def _print_row(r: dict) -> None:
    recall = "-" if r["recall"] is None else f"{100 * r['recall']:.0f}%"
    secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
    missed = "-" if r.get("missed") is None else str(r["missed"])
    print(
        f"{r['family'][:24]:24s} {r['model'][:40]:40s} {r['traced']:8s} {recall:>6s} {str(r['equal']):5s} "
        f"{secs:>6s} {r['sites']:>5d} {missed:>6s}  {r['reason']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
