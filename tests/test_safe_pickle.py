"""Vetting pickled model files: no side effects, linear cost, research checkpoints load (DESIGN §5)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_fresh(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet), as a user's first command would."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------------------ robustbench alias


def test_autoattack_alias_lets_robustbench_import_in_a_fresh_process():
    done = run_fresh(
        """
        import sys
        from graphsparse._compat import ensure_autoattack_alias
        assert ensure_autoattack_alias() and ensure_autoattack_alias()  # safe to call twice
        import autoattack, autoattack.state, pyautoattack.state
        assert autoattack.state is pyautoattack.state  # one module under both names
        import robustbench.eval
        from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
