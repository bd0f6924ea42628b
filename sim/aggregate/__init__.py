"""Entry point of ``python -m sim.aggregate``; the code is sim/experiments/aggregate.py."""

from sim.experiments.aggregate import main

__all__ = ["main"]
