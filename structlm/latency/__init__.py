"""Latency model of the user's hardware: tables measured per model shape and regime, predictions of
a plan's latency, and the budget of a ``speedup=`` / ``latency_ms=`` target (docs/speed.md)."""

from .regime import LatencyError, Regime, measure_models
from .table import LatencyTable, fingerprint
from .cache import table_for

__all__ = ["LatencyError", "LatencyTable", "Regime", "fingerprint", "measure_models", "table_for"]
