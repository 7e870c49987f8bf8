"""Writing one exported file per format, with standard operators only.

- ``onnx``: ``torch.onnx.export`` (the ``torch.export``-based exporter; opsets below 18 use torch's legacy
  TorchScript-based exporter, the only one that writes them), metadata in ``metadata_props``.
- ``pt2``: ``torch.export.export`` then ``torch.export.save``, metadata in an extra file.
- ``torchscript``: ``torch.jit.trace`` then ``torch.jit.save``, metadata in an extra file.

MeanSparse traces as its plain formula under all three (the fast path's library operators are eager-only), and
each writer checks the result: an operator from another namespace than ``aten``/``prims`` (``.pt2``),
``aten``/``prim`` (TorchScript) or the ONNX standard domain would need graphsparse, or a runtime plugin, to run.
"""

from __future__ import annotations

import contextlib
import json
import operator
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from graphsparse.deploy.metadata import EXTRA_FILE
from graphsparse.errors import GraphsparseError

__all__ = ["FORMATS", "ExportError", "write"]

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
"""Export formats and the file suffix each gets by default."""

LEGACY_OPSET_BELOW = 18
"""The torch.export-based ONNX exporter writes opset 18 and later; lower opsets go through the legacy one."""


class ExportError(GraphsparseError):
    """A model could not be exported, or its exported file does not compute what the model computes."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's deprecation notices for torch.jit and the legacy ONNX exporter (chosen on purpose here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _dynamic(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None


def _refuse(where: str, ops: Iterable[str]) -> None:
    ops = sorted(set(ops))
    if ops:
        raise ExportError(
            f"the {where} uses operators outside the standard set: {', '.join(ops[:6])}; the file would not run "
            "without the library that defines them. Hint: export with GRAPHSPARSE_FAST=0, and report the model."
        )


def _check_program(ep: torch.export.ExportedProgram) -> None:
    foreign = []
    for gm in ep.graph_module.modules():  # higher-order operators keep their bodies in submodules
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            target = node.target
            if node.op != "call_function" or isinstance(target, torch._ops.HigherOrderOperator):
                continue
            if isinstance(target, torch._ops.OpOverload):
                if target.namespace not in ("aten", "prims"):
                    foreign.append(str(target))
            elif getattr(target, "__module__", None) not in ("_operator", operator.__name__):
                foreign.append(getattr(target, "__qualname__", str(target)))
    _refuse("exported program", foreign)


def _check_torchscript(module: torch.jit.ScriptModule) -> None:
    kinds = [n.kind() for n in module.inlined_graph.nodes()]
    foreign = [k for k in kinds if k.split("::")[0] not in ("aten", "prim") or k == "prim::PythonOp"]
    _refuse("TorchScript graph", foreign)


def _check_onnx(model) -> None:
    local = {(f.domain, f.name): f for f in model.functions}
    foreign, seen = [], set()

    def walk(nodes) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in local:
                if key not in seen:
                    seen.add(key)
                    walk(local[key].node)
            elif node.domain not in ("", "ai.onnx"):
                foreign.append(f"{node.domain}::{node.op_type}")

    walk(model.graph.node)
    _refuse("ONNX graph", foreign)


def _write_onnx(model, probe, tmp: str, opset: int | None, dynamic_batch: bool, meta: dict[str, str]) -> None:
    import onnx

    with _quiet(), torch.no_grad():
        if opset is not None and opset < LEGACY_OPSET_BELOW:
            torch.onnx.export(
                model, (probe,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}
                if dynamic_batch else None,
            )
        else:
            program = torch.onnx.export(
                model, (probe,), dynamo=True, opset_version=opset, dynamic_shapes=_dynamic(dynamic_batch),
                verbose=False, optimize=True,
            )
            program.save(tmp)
    proto = onnx.load(tmp)
    _check_onnx(proto)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **meta})
    onnx.save(proto, tmp)


def _write_pt2(model, probe, tmp: str, dynamic_batch: bool, meta: dict[str, str]) -> None:
    with _quiet(), torch.no_grad():
        program = torch.export.export(model, (probe,), dynamic_shapes=_dynamic(dynamic_batch))
    _check_program(program)
    with open(tmp, "wb") as f:  # a file object: torch warns about a path not ending in .pt2 (the temp file's)
        torch.export.save(program, f, extra_files={EXTRA_FILE: json.dumps(meta)})


def _write_torchscript(model, probe, tmp: str, meta: dict[str, str]) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, probe, check_trace=False)
        _check_torchscript(traced)
        torch.jit.save(traced, tmp, _extra_files={EXTRA_FILE: json.dumps(meta)})


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch.onnx colours its messages
    return (text.splitlines() or [type(e).__name__])[0][:300]


def write(
    fmt: str,
    model: nn.Module,
    probe: torch.Tensor,
    tmp: str | Path,
    *,
    opset: int | None,
    dynamic_batch: bool,
    meta: dict[str, str],
) -> None:
    """Export ``model`` (on CPU, in eval mode) for inputs like ``probe`` to ``tmp`` in format ``fmt``."""
    tmp = str(tmp)
    try:
        if fmt == "onnx":
            _write_onnx(model, probe, tmp, opset, dynamic_batch, meta)
        elif fmt == "pt2":
            _write_pt2(model, probe, tmp, dynamic_batch, meta)
        else:
            _write_torchscript(model, probe, tmp, meta)
    except GraphsparseError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporters raise many types; say which step failed and why
        first = _first_line(e)
        if e.__cause__ is not None:  # torch.onnx wraps the error that says what failed
            first += f" ({type(e.__cause__).__name__}: {_first_line(e.__cause__)})"
        raise ExportError(
            f"exporting to {fmt} failed: {type(e).__name__}: {first}. Hint: try another --format, or set "
            "GRAPHSPARSE_DEBUG=1 to see the traceback"
        ) from e
