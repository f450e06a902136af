"""Differential privacy: per-example gradients, the privacy plan of a run, and its accounting."""
