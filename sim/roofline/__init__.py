"""Entry point of ``python -m sim.roofline``; the code is sim/experiments/roofline.py."""

from sim.experiments.roofline import main

__all__ = ["main"]
