"""Stage 1, the model as a graph: trace it (``capture``, with the leaf policy and fallback tracing of ``tracer`` and
the probe's record of what ran, ``census``), find its activations (``activations``), give each a role (``roles``)
and list the sites where an operator may go (``sites``).

May import: :mod:`graphsparse.ops`, ``errors``, ``data``, ``_files``, ``_compat``. Knows nothing of rule files,
statistics, attacks or files on disk.
"""
