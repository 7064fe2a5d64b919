"""The compiled-kernel launch cache (``moe_dispatch.kernels._launch``).

* Its key must tell apart every argument Triton specializes on (else a launch could run a
  kernel compiled for another alignment / value class): checked on the key itself (CPU).
* Its per-kernel binder gives, for every project kernel, the key of a loop over ``_spec``
  (positional or keyword calls, defaults, every argument class), and sends an unknown
  keyword through ``kernel[grid]`` uncached (CPU).
* Launches through it compute the same as ``kernel[grid]``: under TRITON_INTERPRET=1 on
  CPU (the normal path), and on a GPU, where the second launch of a specialization goes
  through the cache, across aligned and unaligned pointers, ints equal to 1 / multiples of
  16 / others, dtypes and constexpr values.
"""
import pytest
import torch

# First: sets TRITON_INTERPRET on CPU machines before the kernels are defined.
from triton_mode import DEV, HAS_TRITON, needs_triton  # noqa: E402

pytestmark = needs_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from moe_dispatch.kernels import _launch

    @triton.jit
    def _axpb_kernel(x_ptr, out_ptr, n, a, b, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(x_ptr + i, mask=m, other=0).to(tl.float32)
        tl.store(out_ptr + i, (x * a + b + SHIFT).to(out_ptr.dtype.element_ty), mask=m)


def _spec_key(*args, constexpr=None):
    constexpr = constexpr or (False,) * len(args)
    return tuple(_launch._spec(v, c) for v, c in zip(args, constexpr))


def test_key_tells_apart_what_triton_specializes():
    base = torch.zeros(64, dtype=torch.float32)
    # ints: 1, multiples of 16, others, and widths
    assert _spec_key(1) != _spec_key(2)
    assert _spec_key(16) != _spec_key(17)
    assert _spec_key(32) == _spec_key(48)
    assert _spec_key(2**31 - 1) != _spec_key(2**31)
    assert _spec_key(2**40) != _spec_key(2**63)
    # tensors: dtype and 16-byte alignment of the address (a view at an offset)
    assert _spec_key(base) != _spec_key(base[1:])
    assert _spec_key(base) == _spec_key(base[4:])
    assert _spec_key(base) != _spec_key(base.to(torch.bfloat16))
    # bools, floats, None are their own classes; constexprs keyed by value
    assert _spec_key(True) != _spec_key(1)
    assert _spec_key(1.0) != _spec_key(1)
    assert _spec_key(None) != _spec_key(0)
    assert _spec_key(4, constexpr=(True,)) != _spec_key(8, constexpr=(True,))


def _reference(x, a, b, shift, dtype):
    return (x.float() * a + b + shift).to(dtype)


CASES = [  # (n, offset into the input, a, b, SHIFT, in dtype, out dtype)
    (100, 0, 2.0, 1.0, 0, torch.float32, torch.float32),
    (100, 1, 2.0, 1.0, 0, torch.float32, torch.float32),  # unaligned input
    (1, 0, -1.0, 0.5, 3, torch.bfloat16, torch.float32),  # n == 1
    (64, 3, 0.25, 0.0, 3, torch.bfloat16, torch.bfloat16),
    (64, 0, 0.25, 0.0, 1, torch.float16, torch.float32),
]


@pytest.mark.parametrize("n,off,a,b,shift,dt_in,dt_out", CASES)
def test_launch_matches_reference(n, off, a, b, shift, dt_in, dt_out):
    g = torch.Generator().manual_seed(n + off)
    x_full = torch.randn(n + off, generator=g).to(dt_in).to(DEV)
    x = x_full[off:]
    for attempt in range(3):  # the 2nd and 3rd launches take the cache on a GPU
        out = torch.full((n,), float("nan"), dtype=dt_out, device=DEV)
        _launch.launch(_axpb_kernel, (triton.cdiv(n, 32),), x, out, n, a, b, SHIFT=shift,
                       BLOCK=32, num_warps=1)
        # Same float32 math; the interpreter's bf16 rounding may differ by one unit.
        torch.testing.assert_close(out.cpu(), _reference(x.cpu(), a, b, shift, dt_out))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cache is used on GPUs only")
def test_cache_is_used_on_gpu():
    x = torch.randn(256, device="cuda")
    out = torch.empty_like(x)
    before = len(_launch._compiled)
    for n in (256, 256, 255, 255, 1):
        _launch.launch(_axpb_kernel, (triton.cdiv(n, 64),), x, out, n, 1.0, 0.0, SHIFT=0,
                       BLOCK=64, num_warps=2)
    # three specializations of n (multiple of 16, other, 1): three entries, not five
    assert len(_launch._compiled) - before == 3
    torch.testing.assert_close(out[:1], x[:1])
    if _launch._knobs is not None:  # Triton >= 3.4: the cached launches went direct
        assert _launch._direct_ok is True
        assert all(type(e) is _launch._Direct for e in _launch._compiled.values())


# ---------------------------------------------------------------- the direct launcher
# A compiled CUDA kernel cannot exist on a CPU machine: these tests stand in for Triton's
# ``CompiledKernel`` (its launcher, handles and hooks) and check that the cache calls the
# launcher exactly as ``CompiledKernel[grid](*args)`` does (Triton 3.4-3.8:
# ``run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
# exit_hook, *args)``), and falls back to ``[grid]`` when the launcher rejects the call.
# ``test_cache_is_used_on_gpu`` and every GPU test run the real one.


class _FakeCompiled:
    def __init__(self, reject=False):
        self.function, self.packed_metadata = object(), object()
        self.direct, self.runner_calls, self.reject = [], [], reject

    @property
    def run(self):
        def run(*a):
            if self.reject:
                raise TypeError("launcher wants other arguments")
            self.direct.append(a)
        return run

    def launch_metadata(self, grid, stream, *args):
        return ("md", grid, stream, len(args))

    def __getitem__(self, grid):
        return lambda *args: self.runner_calls.append((grid, args))


class _FakeKernel:
    """The jit function's signature (for the cache's key) and a ``[grid]`` that compiles
    (returns the stand-in compiled kernel)."""

    def __init__(self, compiled):
        import inspect
        from types import SimpleNamespace
        self.fn, self.compiled, self.jit_calls = _axpb_kernel.fn, compiled, 0
        # (The interpreter's jit function has no ``params``: read them as Triton does.)
        self.params = [SimpleNamespace(num=i, is_constexpr=p.annotation in (tl.constexpr,
                                                                             "tl.constexpr"))
                       for i, p in enumerate(inspect.signature(self.fn).parameters.values())]
        assert [p.is_constexpr for p in self.params] == [False] * 5 + [True] * 2

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.jit_calls += 1
            return self.compiled
        return call


@pytest.fixture
def direct_env(monkeypatch):
    hooks = type("Rt", (), {"launch_enter_hook": object(), "launch_exit_hook": object()})
    monkeypatch.setattr(_launch, "_enabled", lambda: True)
    monkeypatch.setattr(_launch, "_knobs", type("K", (), {"runtime": hooks}))
    monkeypatch.setattr(_launch, "_raw_stream", lambda device: 1000 + device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "_direct_ok", None)
    return hooks


def _launch_fake(kernel, n=64):
    x, out = torch.zeros(n), torch.zeros(n)
    _launch.launch(kernel, (2,), x, out, n, 1.5, 0.5, SHIFT=1, BLOCK=32, num_warps=1)
    return (x, out, n, 1.5, 0.5, 1, 32)


def test_direct_launch_passes_what_the_runner_passes(direct_env):
    compiled = _FakeCompiled()
    kern = _FakeKernel(compiled)
    _launch_fake(kern)  # compiles (the jit path), caches
    assert kern.jit_calls == 1 and not compiled.direct
    full = _launch_fake(kern)
    full2 = _launch_fake(kern)
    assert kern.jit_calls == 1 and not compiled.runner_calls
    assert len(compiled.direct) == 2
    for got, want_args in zip(compiled.direct, (full, full2)):
        gx, gy, gz, stream, fn, meta, md, enter, exit_, *args = got
        assert (gx, gy, gz, stream) == (2, 1, 1, 1003)  # grid padded to 3-D, device 3's stream
        assert fn is compiled.function and meta is compiled.packed_metadata
        assert md == ("md", (2, 1, 1), 1003, len(want_args))
        assert enter is direct_env.launch_enter_hook and exit_ is direct_env.launch_exit_hook
        assert len(args) == len(want_args)
        assert all(a is b or a == b for a, b in zip(args, want_args))  # constexprs included
    assert _launch._direct_ok is True


def test_direct_launch_falls_back_when_rejected(direct_env):
    compiled = _FakeCompiled(reject=True)
    kern = _FakeKernel(compiled)
    _launch_fake(kern)
    _launch_fake(kern)  # direct launch rejected before running: through [grid] instead
    _launch_fake(kern)  # and from now on straight through [grid]
    assert not compiled.direct and len(compiled.runner_calls) == 2
    assert compiled.runner_calls[0][0] == (2, 1, 1)
    assert _launch._direct_ok is False
    assert all(type(e) is not _launch._Direct for e in _launch._compiled.values())


def test_old_triton_uses_the_runner(direct_env, monkeypatch):
    monkeypatch.setattr(_launch, "_knobs", None)  # before Triton 3.4
    compiled = _FakeCompiled()
    kern = _FakeKernel(compiled)
    for _ in range(3):
        _launch_fake(kern)
    assert not compiled.direct and len(compiled.runner_calls) == 2


# --------------------------------------------------------------------- the binder (CPU)


def _project_kernels():
    import importlib
    out = []
    for mod in ("_triton", "_pack", "_route", "_check", "_fp8"):
        m = importlib.import_module(f"moe_dispatch.kernels.{mod}")
        out += [(f"{mod}.{n}", k) for n, k in vars(m).items()
                if hasattr(k, "fn") and n.endswith("_kernel")]
    assert len(out) >= 12, [n for n, _ in out]
    return out


def _loop_key(kernel, device, args, kwargs):
    """The key as the cache computed it before the binder: a loop over ``_spec``."""
    import inspect
    params = list(inspect.signature(kernel.fn).parameters.values())
    const = _launch._constexpr_params(kernel, params)
    full = list(args) + [kwargs[p.name] if p.name in kwargs else p.default
                         for p in params[len(args):]]
    return tuple([id(kernel), device] + [kwargs.get(o) for o in _launch._OPTIONS]
                 + [_launch._spec(v, i in const) for i, v in enumerate(full)]), full


def _sample(rng, i):
    """An argument of a random class: tensors (dtypes, aligned or not, a Parameter), ints
    (1, multiples of 16, others, 64-bit), bools, floats, None."""
    base = torch.zeros(64, dtype=[torch.float32, torch.bfloat16, torch.int32][i % 3])
    choices = [base, base[1:], base[2:], base[8:], torch.nn.Parameter(torch.zeros(4)), 1, 16,
               48, 7, 8, 24, 0, -16, 2**31 - 1, 2**31, -2**31, 2**40, True, False, 1.5, None]
    return choices[rng.randrange(len(choices))]


@pytest.mark.parametrize("name,kernel", _project_kernels())
def test_binder_key_equals_the_spec_loop(name, kernel):
    import inspect
    import random
    rng = random.Random(name)
    params = list(inspect.signature(kernel.fn).parameters.values())
    bind = _launch._binder(kernel)
    for trial in range(40):
        vals = [_sample(rng, i) for i in range(len(params))]
        n_pos = rng.randrange(len(params) + 1)  # the rest by keyword, some left to defaults
        args = vals[:n_pos]
        kwargs = {p.name: v for p, v in zip(params[n_pos:], vals[n_pos:])
                  if p.default is inspect.Parameter.empty or rng.random() < 0.5}
        if trial % 3 == 0:
            kwargs["num_warps"] = rng.choice([1, 4, 8])
        key, full = bind(id(kernel), 2, *args, **kwargs)
        want_key, want_full = _loop_key(kernel, 2, args, kwargs)
        assert key == want_key, (name, trial)
        assert len(full) == len(want_full) and all(a is b for a, b in zip(full, want_full))


def test_binder_bypasses_unknown_options(direct_env):
    compiled = _FakeCompiled()
    kern = _FakeKernel(compiled)
    x, out = torch.zeros(64), torch.zeros(64)
    for _ in range(3):  # an option the key does not know: never cached, always [grid]
        _launch.launch(kern, (2,), x, out, 64, 1.5, 0.5, SHIFT=1, BLOCK=32, num_warps=1,
                       launch_cooperative_grid=True)
    assert kern.jit_calls == 3 and not _launch._compiled and not compiled.direct


def test_binder_refuses_names_it_uses():
    class K:
        params = []

        @staticmethod
        def fn(x_ptr, _dev, BLOCK: tl.constexpr):
            pass
    with pytest.raises(ValueError, match="_dev"):
        _launch._binder(K)


def test_host_int_helpers_equal_tritons():
    # The kernels size their grids with these instead of Triton's (constexpr functions since
    # Triton 3.5, ~5 µs per host call): same values, zero and powers of two included.
    for n in [*range(-3, 2100), 2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert _launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        if n >= 0:
            for d in (1, 3, 16, 64, 128, 1000):
                assert _launch.cdiv(n, d) == triton.cdiv(n, d), (n, d)
