"""Running an exported file in its own runtime and comparing it with the eager model.

ONNX files run in onnxruntime (CPU). ``.pt2`` programs and TorchScript files run in a fresh Python process in
which importing graphsparse fails, so a file that silently needs graphsparse cannot pass.

MeanSparse's hard threshold turns a last-bit difference between two backends into a jump (``x`` on one side of
the band edge, ``μ`` on the other). The eager pass therefore counts, per sample, the MeanSparse inputs within
rounding distance of a band edge: ``| |x − μ| − α·σ | ≤ rel · α·σ``, ``rel`` = :data:`EDGE_REL` (float32) or 10
units in the last place of the dtype (half precision). A sample whose logits differ by more than the tolerance
passes only when it has such values; predictions (argmax) that differ on a sample without any fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graphsparse.deploy.formats import ExportError

__all__ = ["EDGE_REL", "RTOL", "Verification", "band_edges", "run_exported", "verify"]

EDGE_REL = 1e-5
"""Relative distance to a band edge (of ``α·σ``) counted as "within rounding distance", float32."""

RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
"""Tolerance on the logits: ``max |Δ| ≤ RTOL[dtype] · max(1, max |eager logits|)``, per sample."""


@dataclass
class Verification:
    """What verifying an exported file found.

    Attributes:
        runtime: where the file ran (``onnxruntime 1.x (CPU)``, ``torch.export.load in a process without
            graphsparse``, ...).
        samples: compared samples (probe and data).
        data_samples: how many of them came from the data source.
        max_abs_diff: largest ``|exported − eager|`` over every logit.
        tolerance: the per-sample bound on ``max |Δ|`` (see :data:`RTOL`).
        argmax_agree: samples whose predicted class is the same.
        over_tolerance: samples whose ``max |Δ|`` exceeds the tolerance.
        unexplained: of those, samples without any MeanSparse input near a band edge.
        band_edge_values: MeanSparse inputs within rounding distance of a band edge (all samples).
        band_edge_samples: samples with at least one such value.
        meansparse_values: MeanSparse inputs seen (all samples, all operators).
        edge_rel: the relative distance used.
        passed: no unexplained difference and no unexplained prediction change.
        message: one line saying so.
    """

    runtime: str
    samples: int
    data_samples: int
    max_abs_diff: float
    tolerance: float
    argmax_agree: int
    over_tolerance: int
    unexplained: int
    band_edge_values: int
    band_edge_samples: int
    meansparse_values: int
    edge_rel: float
    passed: bool
    message: str
    argmax_unexplained: int = 0
    details: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def edge_rel(dtype: torch.dtype) -> float:
    """The relative band-edge distance used for ``dtype``."""
    return EDGE_REL if dtype == torch.float32 else 10 * torch.finfo(dtype).eps


def band_edges(model: nn.Module, x: torch.Tensor, rel: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run ``model`` on ``x`` (eager, no grad) and count, per sample, the MeanSparse inputs within ``rel·α·σ`` of a
    band edge. Returns ``(output, counts of shape [B], number of MeanSparse inputs)``."""
    from graphsparse.ops.meansparse import MeanSparse, operators

    counts = torch.zeros(x.shape[0], dtype=torch.long)
    seen = [0]

    def hook(op: MeanSparse, args: tuple) -> None:
        t = args[0]
        mu, thr = op.thresholds(t.dtype)
        shape = [1] * t.dim()
        shape[op.channel_axis % t.dim()] = -1
        mu, thr = mu.reshape(shape).float(), thr.reshape(shape).float()
        near = (thr > 0) & (((t.float() - mu).abs() - thr).abs() <= rel * thr)
        counts.add_(near.reshape(t.shape[0], -1).sum(1))
        seen[0] += t.numel()

    handles = [op.register_forward_pre_hook(hook) for op in operators(model, types=(MeanSparse,)).values()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, counts, seen[0]


_RUNNER = r"""
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "graphsparse" or name.startswith("graphsparse."):
            raise ImportError("graphsparse is blocked here: the exported file must run without it (" + name + ")")
        return None

sys.meta_path.insert(0, _Blocked())
import torch

kind, model_path, inputs_path, outputs_path, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
inputs = torch.load(inputs_path, weights_only=True)
module = torch.export.load(model_path).module() if kind == "pt2" else torch.jit.load(model_path)
with torch.no_grad():
    outputs = [module(x) for x in inputs]
assert not any(m == "graphsparse" or m.startswith("graphsparse.") for m in sys.modules)
torch.save(outputs, outputs_path)
"""


def run_exported(fmt: str, path: str | Path, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    """Outputs of the exported file on each batch, in its own runtime; and a description of that runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            outs = [torch.from_numpy(session.run(None, {name: b.numpy()})[0]) for b in batches]
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types; the first line says what failed
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ExportError(f"onnxruntime cannot run the exported file: {first}") from e
        return outs, f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
    loader = "torch.export.load" if fmt == "pt2" else "torch.jit.load"
    with tempfile.TemporaryDirectory(prefix="graphsparse-verify-") as tmp:
        inputs, outputs = Path(tmp) / "inputs.pt", Path(tmp) / "outputs.pt"
        torch.save(batches, inputs)
        args = [fmt, str(Path(path).resolve()), str(inputs), str(outputs), str(torch.get_num_threads())]
        done = subprocess.run(
            [sys.executable, "-c", _RUNNER, *args], cwd=tmp, capture_output=True, text=True, timeout=1800,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
            raise ExportError(f"the exported file does not run with {loader} in a process without graphsparse: {last}")
        outs = torch.load(outputs, weights_only=True)
    return outs, f"{loader}, torch {torch.__version__.split('+')[0]}, in a process where graphsparse cannot be imported"


def verify(
    fmt: str,
    path: str | Path,
    model: nn.Module,
    batches: list[torch.Tensor],
    rows: list[int],
    data_samples: int,
) -> Verification:
    """Compare the exported file at ``path`` with ``model`` on ``batches`` (of which the first ``rows[i]`` rows
    count: fixed-batch files get padded batches)."""
    dtype = batches[0].dtype
    rel = edge_rel(dtype)
    eager, counts, seen = [], [], 0
    for b in batches:
        out, c, n = band_edges(model, b, rel)
        if not isinstance(out, torch.Tensor):
            raise ExportError(f"the model returns {type(out).__name__}, not one tensor of logits; cannot verify it")
        eager.append(out)
        counts.append(c)
        seen += n
    exported, runtime = run_exported(fmt, path, batches)
    ref = torch.cat([e[:r] for e, r in zip(eager, rows)]).float()
    got = torch.cat([e[:r] for e, r in zip(exported, rows)]).float()
    edges = torch.cat([c[:r] for c, r in zip(counts, rows)])
    if got.shape != ref.shape:
        raise ExportError(f"the exported file returns shape {tuple(got.shape)}, the model {tuple(ref.shape)}")
    diff = (got - ref).abs().reshape(len(ref), -1).amax(1)
    diff = torch.where(torch.isnan(diff), torch.inf, diff)  # a NaN output is a difference, never a pass
    tol = RTOL[dtype] * max(1.0, float(ref.abs().max()))
    same = got.reshape(len(ref), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)
    over = diff > tol
    explained = edges > 0
    unexplained = int((over & ~explained).sum())
    argmax_unexplained = int((~same & ~explained).sum())
    passed = unexplained == 0 and argmax_unexplained == 0
    n = len(ref)
    summary = (
        f"max |Δ| {float(diff.max()):.3g} (tolerance {tol:.3g} per sample), argmax equal on {int(same.sum())}/{n}, "
        f"{int(edges.sum())} MeanSparse inputs within {rel:.0e}·α·σ of a band edge "
        f"in {int(explained.sum())}/{n} samples"
    )
    if passed:
        message = f"verified in {runtime}: {summary}"
        if int(over.sum()):
            message += f"; {int(over.sum())} samples beyond the tolerance, each with band-edge values"
    else:
        message = (
            f"the exported file does not compute what the model computes ({runtime}): {summary}; "
            f"{unexplained} samples beyond the tolerance and {argmax_unexplained} changed predictions without any "
            "band-edge value to explain them"
        )
    details = [
        {"max_abs_diff": float(d), "argmax_equal": bool(s), "band_edge_values": int(e)}
        for d, s, e in zip(diff, same, edges)
    ]
    return Verification(
        runtime=runtime, samples=n, data_samples=data_samples, max_abs_diff=float(diff.max()), tolerance=tol,
        argmax_agree=int(same.sum()), over_tolerance=int(over.sum()), unexplained=unexplained,
        band_edge_values=int(edges.sum()), band_edge_samples=int(explained.sum()), meansparse_values=seen,
        edge_rel=rel, passed=passed, message=message, argmax_unexplained=argmax_unexplained, details=details,
    )
