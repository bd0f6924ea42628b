"""Experiments over the simulator: sweeps (resumable jobs), policy search, their aggregation into
one table, summary figures, the Amortization Roofline of speculative runs, and validation (simulated
against measured rows). They use the core's public API (``sim.run``, ``sim.report``,
``sim.timeline``, the specs); the core never imports them.

Commands: ``python -m sim.sweep`` (``moe-sweep``), ``python -m sim.aggregate``,
``python -m sim.roofline`` (thin entry points in ``sim/sweep``, ``sim/aggregate``, ``sim/roofline``).
"""
