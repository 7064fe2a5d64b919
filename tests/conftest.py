import importlib.util
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


def pytest_configure(config):
    # Without a GPU the kernel tests run interpreted; also compile for sm_90 every Triton
    # launch they make (tests/triton_compile_check.py), since the interpreter accepts code a
    # GPU compile rejects. MOE_TRITON_COMPILE_CHECK=0 skips it.
    if os.environ.get("MOE_TRITON_COMPILE_CHECK", "1") == "0":
        return
    if importlib.util.find_spec("triton") is None:
        return
    import torch
    if torch.cuda.is_available():
        return
    import triton_compile_check
    if not config.pluginmanager.is_registered(triton_compile_check):
        config.pluginmanager.register(triton_compile_check, "triton_compile_check")
