"""Write examples/quickstart.ipynb (the notebook's source of truth is this script; CI executes the notebook).

    python tools/make_quickstart.py [-o PATH]

Cell ids are numbered, so the same script always writes the same bytes (a test compares them).
"""

import argparse
from pathlib import Path

import nbformat as nbf

from graphsparse.artifact.io import atomic_write

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"

CELLS = [
    ("md", "# graphsparse quickstart\n\nThe programmatic API on the shipped demo model (a small pre-activation "
           "ResNet adversarially trained on MNIST-5k): find sites, plan with a rule, rewrite, calibrate, tune α, "
           "evaluate honestly (exact and BPDA gradients), plot, save and load."),
    ("code", "import torch\n\nimport graphsparse as gs\nfrom graphsparse.data import load_dataset, make_loader\n"
             "from graphsparse.demo.models import load_demo_model\n\nmodel = load_demo_model()\n"
             "x = torch.zeros(1, 1, 28, 28)\nsites = gs.find_sites(model, x)\n"
             "[(s.id, s.op, s.role) for s in sites][:5]"),
    ("md", "A rule file decides where operators go; the plan shows, for every site, the action, α and the rule "
           "that decided it (an HTML table in a notebook)."),
    ("code", "plan = gs.plan(model, 'after_addition', x)\nplan"),
    ("code", "rewritten = gs.rewrite(model, 'after_addition', x)\n"
             "train, val, test = (load_dataset('mnist5k', split=s) for s in ('train', 'val', 'test'))\n"
             "record = gs.calibrate(rewritten, make_loader(train, 250))\n"
             "print(record.samples, 'samples;', len(gs.operators(rewritten)), 'operators calibrated')"),
    ("code", "result = gs.tune(rewritten, val, alphas=[0.0, 0.2, 0.4], eps=0.2, n=32, steps=3)\n"
             "print('chosen alpha', result.chosen_alpha)\nresult.rows()"),
    ("code", "report = gs.evaluate(rewritten, test, attacks=['apgd-ce'], eps=0.2, n=32, steps=3)\n"
             "print(report.verdict)\n{k: report.to_dict()[k] for k in ('base', 'exact', 'bpda')}"),
    ("code", "from IPython.display import Image\n\npng = gs.plot_tuning(result, 'quickstart_tuning.png')\n"
             "Image(filename=str(png))"),
    ("code", "path = gs.save(rewritten, 'quickstart.safetensors')\nsame = gs.load(path)\n"
             "with torch.no_grad():\n    batch = torch.stack([test[i][0] for i in range(8)])\n"
             "    print('identical outputs after load:', torch.equal(rewritten(batch), same(batch)))"),
]


def notebook_text() -> str:
    """The notebook, as the file's text."""
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # nbformat draws random ids
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nbf.writes(nb) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the quickstart notebook from this script's cells.")
    parser.add_argument("-o", "--output", type=Path, default=NOTEBOOK, help=f"where (default: {NOTEBOOK})")
    args = parser.parse_args()
    print(f"wrote {atomic_write(args.output, notebook_text())}")


if __name__ == "__main__":
    main()
