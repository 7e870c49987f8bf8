"""Where the base model comes from: model specs (timm, torchvision, transformers, RobustBench, builder functions,
classes), checkpoint files read by content (``safe_pickle`` refuses pickles that would run code), and recipes that
rebuild the base model when an artifact is loaded.

May import only the shared top-level modules (``errors``, ``model_output``, ``_compat``, ...): every stage after it
may use it.

Modules: ``load`` (load_model, build_from_recipe), ``specs`` (what a spec string names), ``recipes`` (Recipe and
its checks), ``builders`` (an architecture from a recipe, with the trust checks), ``checkpoints`` (weights files:
format, unwrapping, key prefixes), ``infer`` (infer_recipe), ``shapes`` (probe input shapes), ``hf`` (transformers),
``robustbench``, ``safe_pickle`` (vetted unpickling).
"""

from graphsparse.sources.builders import package_to_trust
from graphsparse.sources.checkpoints import CHECKPOINT_KEYS
from graphsparse.sources.infer import infer_recipe
from graphsparse.sources.load import build_from_recipe, load_model
from graphsparse.sources.recipes import RECIPE_KINDS, Recipe
from graphsparse.sources.robustbench import import_robustbench
from graphsparse.sources.safe_pickle import TRUSTED_PACKAGES
from graphsparse.sources.shapes import default_input_shape, parse_input_shape
from graphsparse.sources.specs import FILE_SUFFIXES

__all__ = [
    "CHECKPOINT_KEYS",
    "FILE_SUFFIXES",
    "RECIPE_KINDS",
    "TRUSTED_PACKAGES",
    "Recipe",
    "build_from_recipe",
    "default_input_shape",
    "import_robustbench",
    "infer_recipe",
    "load_model",
    "package_to_trust",
    "parse_input_shape",
]
