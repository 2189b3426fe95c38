"""LAKD (local attention knowledge distillation) and its baselines, mdistiller-compatible."""

__version__ = "0.1.0"
