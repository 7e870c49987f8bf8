"""Provenance that travels inside an exported file, and reading it back.

Every exported file carries the same string fields (ONNX ``metadata_props``; the ``graphsparse.json`` extra file of
a ``.pt2`` program or a TorchScript archive):

=================================  ===================================================================
``graphsparse.version``            the graphsparse release that exported it
``graphsparse.plan``               the applied plan (JSON, as in the artifact)
``graphsparse.alpha``              α per MeanSparse site (JSON object, site id -> α)
``graphsparse.artifact``           the artifact's file name ('' for a model exported from memory)
``graphsparse.artifact_sha256``    SHA-256 of the artifact file's bytes
``graphsparse.tensors_sha256``     the artifact's own digest of its tensors (its ``tensors_sha256``)
``graphsparse.input_shape``        the input shape it was exported for (JSON; ``null`` batch when dynamic)
``graphsparse.dtype``              the floating dtype of its weights and input
=================================  ===================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["EXTRA_FILE", "provenance", "read_export_metadata"]

EXTRA_FILE = "graphsparse.json"
"""Name of the extra file holding the fields in ``.pt2`` programs and TorchScript archives."""


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(
    model: nn.Module,
    *,
    artifact: Path | None,
    artifact_meta: dict[str, str] | None,
    input_shape: tuple[int | None, ...],
    dtype: torch.dtype,
) -> dict[str, str]:
    """The metadata fields of an export of ``model`` (see the module docstring)."""
    from graphsparse import __version__
    from graphsparse.ops.meansparse import MeanSparse, operators
    from graphsparse.planning.rewrite import rewrite_info

    try:
        plan = rewrite_info(model).plan.to_json()
    except Exception:  # noqa: BLE001 - a model not made by graphsparse.rewrite has no plan to record
        plan = ""
    alphas = {site: float(op.alpha) for site, op in operators(model, types=(MeanSparse,)).items()}
    return {
        "graphsparse.version": __version__,
        "graphsparse.plan": plan,
        "graphsparse.alpha": json.dumps(alphas),
        "graphsparse.artifact": artifact.name if artifact is not None else "",
        "graphsparse.artifact_sha256": _file_sha256(artifact) if artifact is not None else "",
        "graphsparse.tensors_sha256": (artifact_meta or {}).get("tensors_sha256", ""),
        "graphsparse.input_shape": json.dumps(list(input_shape)),
        "graphsparse.dtype": str(dtype).removeprefix("torch."),
    }


def read_export_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The graphsparse fields of an exported file (``.onnx``, ``.pt2`` or TorchScript), {} when it has none.

    Reads only metadata: the ONNX graph is not checked, the ``.pt2`` program and the TorchScript module are not
    run (their archives are loaded, which needs no graphsparse).
    """
    import zipfile

    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            # torch.export.save stores extra files under extra/, torch.jit.save under <archive>/extra/
            names = [n for n in z.namelist() if n.endswith(f"extra/{EXTRA_FILE}")]
            return json.loads(z.read(names[0])) if names else {}
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("graphsparse.")}
