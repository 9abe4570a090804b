"""Esper: Blueprints compile into Kernels that grow live models (morphogenetic training)."""

__version__ = "0.1.0"
