"""Testing helpers for graphsparse users: random architectures with known sites (needs hypothesis)."""

from graphsparse.testing.architectures import (
    Act,
    Architecture,
    ExpectedGate,
    ExpectedSite,
    Truth,
    random_architectures,
)

__all__ = ["Act", "Architecture", "ExpectedGate", "ExpectedSite", "Truth", "random_architectures"]
