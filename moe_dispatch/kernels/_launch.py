"""A cheaper host path for launching the project's Triton kernels.

``kernel[grid](*args)`` costs the host 30-70 µs per launch with Triton 3.6 on an H200
(``python -m moe_dispatch.bench.launch``): the JIT binder specializes every argument, hashes
the key and looks the compiled kernel up on each call. The exact (syncing) dispatch makes
several Triton launches per call, so that alone is a few hundred µs of host time.

``launch(kernel, grid, *args, **kwargs)`` makes the first launch of each *specialization*
through ``kernel[grid]`` (compiling if needed) and keeps the ``CompiledKernel`` it returns;
later launches with the same specialization call the compiled kernel's launcher directly
(its C launcher with the stream, grid and launch hooks passed as ``CompiledKernel[grid]``
passes them, without that path's closure and driver look-ups each call). The key is
at least as fine as Triton's own (so the cached kernel is always the one Triton would pick):
per tensor its dtype and whether its address is 16-byte aligned, per int its width class,
whether it is 1 and whether it is a multiple of 16, per bool/float/None the value class, the
constexpr values, and the launch options (``num_warps``, ...). A key Triton would not have
told apart only costs one extra slow-path launch.

Under the interpreter (``TRITON_INTERPRET=1``, the CPU suite) every launch takes the normal
path (there is no compiled kernel). ``MOE_DISPATCH_FAST_LAUNCH=0`` turns the cache off.
A Triton whose compiled kernels lack that launcher interface (before 3.4: no ``knobs``) is
launched through ``CompiledKernel[grid]``, as is one whose launcher rejects the call.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Tuple

import torch

from . import _env

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
try:
    from triton import knobs as _knobs  # Triton >= 3.4: where the launch hooks live
except ImportError:  # older Triton, or none (the interpreter path never gets here)
    _knobs = None


def _enabled() -> bool:
    return (_env.get("TRITON_INTERPRET", "0") != "1"
            and _env.get("MOE_DISPATCH_FAST_LAUNCH", "1") != "0")


class _Signature:
    """A kernel's parameter names, defaults and which are constexpr (read once)."""

    def __init__(self, kernel):
        params = list(inspect.signature(kernel.fn).parameters.values())
        self.names = tuple(p.name for p in params)
        self.defaults = tuple(p.default for p in params)
        const = {p.num for p in kernel.params if p.is_constexpr}
        self.constexpr = tuple(i in const for i in range(len(params)))


_signatures: Dict[int, _Signature] = {}
_compiled: Dict[Tuple, Any] = {}


def _spec(value, constexpr: bool):
    """The part of a specialization key one argument contributes (see the module doc)."""
    if constexpr:
        return value
    kind = type(value)
    if kind is int:  # the common case first: one type test, no isinstance chain
        if -2**31 <= value < 2**31:
            return (32, value == 1, value % 16 == 0)
        return (64 if -2**63 <= value < 2**63 else 65, value == 1, value % 16 == 0)
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() & 15 == 0)
    if kind is bool:
        return ("b",)
    if value is None:
        return None
    if kind is float:
        return ("f",)
    if isinstance(value, int):  # int subclasses (not bool): as ints
        return _spec(int(value), False)
    return (kind, value)  # anything else: keyed by value (never wrongly shared)


class _Direct:
    """A compiled kernel's launcher and handles, read once: ``CompiledKernel[grid]`` looks
    the device and stream up through Triton's driver proxy and builds a closure on every
    launch (a few µs of host time each)."""

    __slots__ = ("compiled", "run", "function", "metadata")

    def __init__(self, compiled):
        self.compiled = compiled
        self.run = compiled.run  # loads the module once
        self.function = compiled.function
        self.metadata = compiled.packed_metadata

    def __call__(self, grid3, device: int, full) -> None:
        """What ``compiled[grid3](*full)`` does on ``device``'s current stream."""
        stream = _raw_stream(device)
        rt = _knobs.runtime
        self.run(grid3[0], grid3[1], grid3[2], stream, self.function, self.metadata,
                 self.compiled.launch_metadata(grid3, stream, *full), rt.launch_enter_hook,
                 rt.launch_exit_hook, *full)


def _entry(compiled):
    """The cache entry of a compiled kernel: a ``_Direct`` where Triton has the interface
    it uses, else the ``CompiledKernel`` itself (launched through ``[grid]``)."""
    if _knobs is None or _raw_stream is None or not all(
            hasattr(compiled, a) for a in ("run", "function", "packed_metadata",
                                           "launch_metadata")):
        return compiled
    return _Direct(compiled)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel`` (a ``triton.jit`` function) on ``grid`` like ``kernel[grid](*args,
    **kwargs)``, through the compiled-kernel cache when possible (module doc)."""
    if not _enabled() or callable(grid):
        kernel[grid](*args, **kwargs)
        return
    sig = _signatures.get(id(kernel))
    if sig is None:
        sig = _signatures[id(kernel)] = _Signature(kernel)
    full = list(args)
    for i in range(len(args), len(sig.names)):
        name = sig.names[i]
        full.append(kwargs[name] if name in kwargs else sig.defaults[i])
    device = torch.cuda.current_device()
    key = [id(kernel), device]
    key.extend(kwargs[k] if k in kwargs else None for k in _OPTIONS)
    key.extend(map(_spec, full, sig.constexpr))
    key = tuple(key)
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None:
            _compiled[key] = _entry(compiled)
        return
    # The compiled kernel's launcher takes every argument, constexprs included, and a 3-D grid.
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    if type(entry) is not _Direct:
        entry[grid3](*full)
    elif _direct_ok:
        entry(grid3, device, full)
    else:
        _first_direct(entry, grid3, device, full)


_direct_ok: "bool | None" = None  # None: no direct launch yet in this process


def _first_direct(entry: _Direct, grid3, device: int, full) -> None:
    """The process's first direct launch, checked: a Triton whose launcher parses its
    arguments differently rejects them with a TypeError before anything runs; then every
    later launch takes ``CompiledKernel[grid]`` (the cache stays)."""
    global _direct_ok
    if _direct_ok is False:
        entry.compiled[grid3](*full)
        return
    try:
        entry(grid3, device, full)
    except TypeError:
        _direct_ok = False
        for k, e in list(_compiled.items()):
            if type(e) is _Direct:
                _compiled[k] = e.compiled
        entry.compiled[grid3](*full)
        return
    _direct_ok = True
