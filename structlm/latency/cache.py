"""Where latency tables live: built once per (model shape, regime, hardware, software, protocol) and
cached under ``~/.cache/structlm/latency/`` (``STRUCTLM_CACHE`` moves the root), or read from a file
the user measured elsewhere (``--latency-table FILE``)."""

from __future__ import annotations

from pathlib import Path

from .regime import LatencyError, Regime, device_name, software
from .table import LatencyTable, cache_dir, cache_key, fingerprint

DEFAULT_PROTOCOL = {"probe_layers": 8, "rounds": 12, "reps": None, "ffn_step": 64, "align": 8}


def cached_path(graph, regime: Regime, protocol: dict | None = None) -> Path:
    protocol = {**DEFAULT_PROTOCOL, **(protocol or {})}
    key = cache_key(fingerprint(graph), regime, {"device_name": device_name(regime.device)}, software(), protocol)
    return cache_dir() / f"{graph.family}-{regime.phase}-b{regime.batch}-s{regime.seq}-{key}.json"


def table_for(graph, config, regime: Regime | None = None, *, table: str | Path | LatencyTable | None = None,
              rebuild: bool = False, progress: bool = True, protocol: dict | None = None) -> tuple[LatencyTable, bool]:
    """The latency table for ``graph``'s model: ``table`` (a file or a table) when given, else the
    cached one for ``regime`` on this machine, measured now when there is none.  Returns
    (table, reused) -- reused is False when it was measured by this call."""
    if isinstance(table, LatencyTable):
        table.check_model(graph)
        return table, True
    if table is not None:
        loaded = LatencyTable.load(table)
        loaded.check_model(graph)
        return loaded, True
    from .measure import build_table, check_regime_device

    regime = regime or Regime.here()
    check_regime_device(regime)
    path = cached_path(graph, regime, protocol)
    if path.is_file() and not rebuild:
        try:
            return LatencyTable.load(path), True
        except (LatencyError, KeyError, TypeError):
            pass    # a damaged cache entry is measured again
    opts = {**DEFAULT_PROTOCOL, **(protocol or {})}
    built = build_table(config, regime, progress=progress, **opts)
    built.check_model(graph)
    built.save(path)
    built.source = str(path)
    return built, False
