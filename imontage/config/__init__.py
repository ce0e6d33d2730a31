"""Recipes: the typed schema and the loader that merges defaults, YAML files and overrides."""

from imontage.config.loader import RecipeError, load_recipe
from imontage.config.schema import RecipeConfig

__all__ = ["RecipeConfig", "RecipeError", "load_recipe"]
