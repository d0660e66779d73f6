"""Model adapters: how dp loads, runs, prunes and saves one family of diffusion models."""

from dpcli.adapters.base import DiffusersAdapter, LazyAdapter, LoadedModel, ModelAdapter, ModelSource

__all__ = ["DiffusersAdapter", "LazyAdapter", "LoadedModel", "ModelAdapter", "ModelSource"]
