"""Files in and out: the base model a user brings (``sources``, read through ``safe_pickle``, which refuses
pickles that would run code) and the rewritten model saved as safetensors with its statistics and records
(``io``, ``records``).

May import: :mod:`graphsparse.planning`, :mod:`graphsparse.graph`, :mod:`graphsparse.ops` and the shared
top-level modules. Knows nothing of statistics or attacks beyond the records they hand it.
"""
