"""Entry point of ``python -m sim.sweep``; the code is sim/experiments/sweep.py."""

from sim.experiments.sweep import main

__all__ = ["main"]
