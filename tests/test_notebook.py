"""examples/quickstart.ipynb runs top to bottom and its outputs say what the API promises."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/plain", ""))
        parts.append(data.get("text/html", ""))
    return "\n".join(parts)


def test_the_committed_notebook_is_what_its_script_writes():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "make_quickstart.py"
    spec = importlib.util.spec_from_file_location("make_quickstart", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert NOTEBOOK.read_text() == script.notebook_text(), "run python tools/make_quickstart.py"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not any(o.get("output_type") == "error" for o in c.get("outputs", [])) for c in code)
    assert "'stem'" in _text(code[0]) or "'main_path'" in _text(code[0])
    assert "<table" in _text(code[1]) and "meansparse" in _text(code[1])
    assert "3500 samples; 6 operators calibrated" in _text(code[2])
    assert "chosen alpha" in _text(code[3])
    assert "'base'" in _text(code[4]) and "'bpda'" in _text(code[4])
    assert any("image/png" in o.get("data", {}) for o in code[5].get("outputs", []))
    assert "identical outputs after load: True" in _text(code[6])
    assert (tmp_path / "quickstart.safetensors").is_file()
