"""``graphsparse inspect MODEL``: list every site (and, with --rule, what a rule file does there)."""

from __future__ import annotations

from collections import Counter

import click

from graphsparse.cli._options import load_cli_model, model_options
from graphsparse.cli._term import console, print_json, table


@click.command("inspect")
@click.argument("model")
@model_options
@click.option("--rule", default=None, help="Rule file (name of a built-in or a path): adds action/α/rule columns.")
@click.option("--alpha", type=float, default=None, help="Override α of every MeanSparse rule.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of site objects.")
def inspect_command(model, arch, allow_modules, input_shape, model_dir, rule, alpha, as_json):
    """Capture MODEL and list the places an operator can go.

    MODEL: timm:NAME, torchvision:NAME, transformers:TYPE, hf:ORG/NAME, robustbench:ID, pkg.module:Class or
    pkg.module:function, or a model file (a pickled module, a state dict or a checkpoint dict with --arch).
    """
    import warnings

    from graphsparse.graph.capture import PartialCaptureWarning, capture
    from graphsparse.graph.sites import sites_of_capture

    module, _recipe, example = load_cli_model(model, arch, allow_modules, input_shape, model_dir)
    cap = capture(module, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialCaptureWarning)  # shown below, with the sites
        sites = sites_of_capture(cap)
    if sites.missed:
        err = console(stderr=True)
        err.print(
            f"warning: {len(sites.missed)} activation place(s) ran on the probe but are not sites (no operator "
            "can go there):"
        )
        for m in sites.missed:
            err.print(f"  missed: {m}")
    entries = None
    if rule is not None:
        from graphsparse.planning.plan import make_plan
        from graphsparse.planning.rules import load_rules

        entries = {e.site.id: e for e in make_plan(sites, load_rules(rule), alpha=alpha).entries}

    if as_json:
        out = []
        for s in sites:
            d = s.to_dict()
            if entries is not None:
                e = entries[s.id]
                d.update(action=e.action, alpha=e.alpha, rule=e.rule_name)
            out.append(d)
        print_json(out)
        return

    columns = ["id", "op", "role", "layout", "channels", "stage", "depth"]
    if entries is not None:
        columns += ["action", "α", "rule"]
    rows = []
    for s in sites:
        row = [s.id, s.op, s.role, s.layout, s.channels, s.stage, s.depth]
        if entries is not None:
            e = entries[s.id]
            row += [e.action, f"{e.alpha:g}" if e.action == "meansparse" else "", e.rule_name]
        rows.append(row)
    out = console()
    out.print(table(columns, rows, title=f"{model}: {len(sites)} sites"))
    roles = Counter(s.role for s in sites)
    opaque = [o for o in cap.opaque]
    out.print(
        f"{len(sites)} sites: "
        + ", ".join(f"{n} {r}" for r, n in roles.items())
        + f"; {len(opaque)} opaque module{'s' if len(opaque) != 1 else ''}"
        + (f"; max |captured − original| = {cap.max_abs_diff:.2g}" if cap.max_abs_diff else "")
    )
    for o in opaque:
        out.print(f"  opaque: {o.path or '<root>'} ({o.module_class}): {o.reason}")
    if entries is not None:
        actions = Counter(e.action for e in entries.values())
        out.print("plan: " + ", ".join(f"{n} {a}" for a, n in actions.items()))
