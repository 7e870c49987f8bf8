"""Robustness: attacks and their plumbing shared by every command (``attacks``, ``samples``), the honest
evaluation (``evaluate``: base, exact-gradient and BPDA attacks, per-sample records in ``per_sample``, the report in
``eval_report``, resumable through ``eval_state``, the base model's results reused through ``attack_cache``),
α tuning (``tune``) and adversarial training of SPARTA parameters (``train``: on the ``pgd`` attack, its record and
checkpoint in ``train_state``).

May import: :mod:`graphsparse.artifact`, :mod:`graphsparse.planning`, :mod:`graphsparse.graph`,
:mod:`graphsparse.ops` and the shared top-level modules; never :mod:`graphsparse.stats`.
"""
