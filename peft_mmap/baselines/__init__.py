"""The benchmark's baselines and MmAP variants (paper Table 1, Table 3, Fig. 4) behind one registry."""

from .persistence import TrainableStateMixin, load_trainable, save_trainable
from .recipes import RECIPES, Recipe
from .registry import METHODS, MethodSpec, build_method, get_method

__all__ = [
    "METHODS",
    "RECIPES",
    "MethodSpec",
    "Recipe",
    "TrainableStateMixin",
    "build_method",
    "get_method",
    "load_trainable",
    "save_trainable",
]
