"""Batches: what the gradient of a whole mini-batch leaks (class mass, counts, smoothing eps, and, for small
batches, every example's soft label and feature)."""
