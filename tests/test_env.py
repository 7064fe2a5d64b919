"""``moe_dispatch.kernels._env.get``: the dispatch path's cheap environment reads must stay live
(tests and the benchmarks flip switches at run time) and agree with ``os.environ.get``."""
import os

from moe_dispatch import kernels
from moe_dispatch.kernels import _env


def test_env_get_is_live_and_matches_os_environ(monkeypatch):
    name = "MOE_DISPATCH_TEST_SWITCH"
    monkeypatch.delenv(name, raising=False)
    assert _env.get(name) is None and _env.get(name, "d") == "d"
    for value in ("0", "1", "", "x,y:z", "é"):
        monkeypatch.setenv(name, value)
        assert _env.get(name, "d") == os.environ.get(name, "d") == value
    os.environ[name] = "direct"  # a plain write, not through monkeypatch
    assert _env.get(name) == "direct"
    monkeypatch.delenv(name)
    assert _env.get(name, "gone") == "gone"
    for other in ("PATH", "HOME", "NOT_SET_ANYWHERE_42"):
        assert _env.get(other) == os.environ.get(other)


def test_triton_switch_is_read_per_call(monkeypatch):
    """``use_triton`` reads MOE_DISPATCH_TRITON on each call (CPU tensors never use it)."""
    import torch

    class _Cuda(torch.Tensor):  # a tensor that says it is on a GPU, for the switch alone
        @property
        def is_cuda(self):
            return True
    t = torch.zeros(2).as_subclass(_Cuda)
    monkeypatch.setenv("MOE_DISPATCH_TRITON", "0")
    assert kernels.use_triton(t) is False
    monkeypatch.setenv("MOE_DISPATCH_TRITON", "1")
    assert kernels.use_triton(t) is (kernels.triton_available() is None)
    assert kernels.use_triton(torch.zeros(2)) is False
