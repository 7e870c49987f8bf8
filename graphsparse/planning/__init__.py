"""Stage 2, deciding and rewriting: rule files (``rules``: the rule model and loading, the built-ins in
``builtin_rules/``; ``rule_parser``, ``selectors``, ``resolve``) decide an action per site (``plan``); ``rewrite``
puts the operators into the traced graph and ``fuse`` folds each activation and its MeanSparse into one module;
``fuse_residual`` makes the view attacks run on (a residual addition and its operator in one kernel pass).

May import: :mod:`graphsparse.graph`, :mod:`graphsparse.sources` (the base model's recipe), :mod:`graphsparse.ops`
and the shared top-level modules. Knows nothing of statistics, attacks or artifact files.
"""
