"""The library version (also in pyproject.toml and in every saved multi-task manifest)."""

__version__ = "0.1.0"
