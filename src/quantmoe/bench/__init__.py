"""Sweeps, the results store and reports."""
