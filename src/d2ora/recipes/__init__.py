"""Recipes: whole runs as library functions (the CLI commands are thin wrappers over them)."""

from d2ora.recipes.train import TrainConfig, train

__all__ = ["TrainConfig", "train"]
