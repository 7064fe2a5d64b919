"""The compiled-kernel launch cache (``moe_dispatch.kernels._launch``).

* Its key must tell apart every argument Triton specializes on (else a launch could run a
  kernel compiled for another alignment / value class): checked on the key itself (CPU).
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
