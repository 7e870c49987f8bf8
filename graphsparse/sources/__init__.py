"""Where the base model comes from: model specs (timm, torchvision, transformers, RobustBench, builder functions,
classes), checkpoint files read by content (``safe_pickle`` refuses pickles that would run code), and recipes that
rebuild the base model when an artifact is loaded.

May import only the shared top-level modules (``errors``, ``model_output``, ``_compat``, ...): every stage after it
may use it.
"""

from graphsparse.sources.model_sources import (
    FILE_SUFFIXES,
    RECIPE_KINDS,
    TRUSTED_PACKAGES,
    Recipe,
    build_from_recipe,
    default_input_shape,
    import_robustbench,
    load_model,
    parse_input_shape,
)

__all__ = [
    "FILE_SUFFIXES",
    "RECIPE_KINDS",
    "TRUSTED_PACKAGES",
    "Recipe",
    "build_from_recipe",
    "default_input_shape",
    "import_robustbench",
    "load_model",
    "parse_input_shape",
]
