"""The artifact, in and out: the rewritten model saved as safetensors with its plan, statistics, recipe and records
(``io``), and the records each stage adds to it (``records``).

May import: :mod:`graphsparse.planning`, :mod:`graphsparse.graph`, :mod:`graphsparse.sources`,
:mod:`graphsparse.ops` and the shared top-level modules. Knows nothing of statistics or attacks beyond the records
they hand it.
"""
