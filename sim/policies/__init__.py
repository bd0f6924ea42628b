"""Policies and predictors: plain objects, chosen by name from registries."""

from sim.policies import eviction, predictors, prefetch, replay, speculative  # noqa: F401  (registration)
from sim.policies.base import EVICTION, PREDICTORS, PREFETCH, Cancel, EvictionPolicy, Fetch, PolicyContext, PrefetchPolicy

__all__ = [
    "EVICTION",
    "PREDICTORS",
    "PREFETCH",
    "Cancel",
    "EvictionPolicy",
    "Fetch",
    "PolicyContext",
    "PrefetchPolicy",
]
