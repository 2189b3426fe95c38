"""LAKD's mechanics. They depend only on torch, so they can move into upstream mdistiller as-is."""
