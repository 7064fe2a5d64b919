import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dist_pool import GlooPool  # noqa: E402

_pools = {}


def _pool(world):
    p = _pools.get(world)
    if p is None or p.broken:
        if p is not None:
            p.close()
        p = _pools[world] = GlooPool(world)
    return p


@pytest.fixture
def gloo_pool():
    """gloo_pool(world) -> a live pool of `world` gloo ranks (shared across tests)."""
    return _pool


def pytest_sessionfinish(session, exitstatus):
    for p in _pools.values():
        p.close()
