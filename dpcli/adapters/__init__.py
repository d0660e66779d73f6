"""Model adapters: how dp loads, runs, prunes and saves one family of diffusion models."""

from dpcli.adapters.base import LoadedModel, ModelAdapter, ModelSource

__all__ = ["LoadedModel", "ModelAdapter", "ModelSource"]
