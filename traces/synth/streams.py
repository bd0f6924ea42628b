"""One random stream per generator component, so changing one dial leaves the others' draws alone."""

from __future__ import annotations

import numpy as np

# component ids of the random streams (never renumber: it would change every trace)
_LENGTHS, _STRUCTURE, _HOT, _CHAIN, _GATES, _ORDER, _LOOKAHEAD, _DRAFT, _ACCEPT = range(9)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(key)))

