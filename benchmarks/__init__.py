"""Benchmarks: one script per figure (see README.md in this folder)."""
