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
told apart only costs one extra slow-path launch. The key comes from a binder generated once
per kernel (``_binder``: Python binds the call, each argument's key part inline), ~6 µs of
host time per cached launch on the development CPU against ~9 for a loop over the arguments
(``benchmarks/scripts/launch_key_cpu.py``).

Under the interpreter (``TRITON_INTERPRET=1``, the CPU suite) every launch takes the normal
path (there is no compiled kernel). ``MOE_DISPATCH_FAST_LAUNCH=0`` turns the cache off.
A Triton whose compiled kernels lack that launcher interface (before 3.4: no ``knobs``) is
launched through ``CompiledKernel[grid]``, as is one whose launcher rejects the call.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Tuple

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


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for host ints (block counts of a grid). Triton's own ``triton.cdiv`` and
    ``triton.next_power_of_2`` are constexpr functions since 3.5: each host call goes through
    their argument unwrapping, ~5 µs on the development CPU against ~0.1 here, and a dispatch
    sizes its launches with ~20 such calls."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n = 1; 0 for n <= 0, as Triton's)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


_compiled: Dict[Tuple, Any] = {}
_binders: Dict[int, Tuple[Any, Callable]] = {}  # id(kernel) -> (kernel, its binder)


def _binder(kernel) -> Callable:
    """A function made once per kernel (as Triton's own binder is) that takes the kernel's
    arguments the way the kernel does, positional or keyword, with its defaults, and returns
    ``(key, full)``: the specialization key (module doc; the same tuple ``_spec`` gives per
    argument, after the kernel's id, the device and the launch options) and every argument
    in order, constexprs included, for the launcher. Python binds the call itself and each
    tensor / int's key part is computed inline, not by a call per argument (module doc for
    what that saves). An unknown keyword (another launch option) returns ``(None,
    None)``: the launch then goes through ``kernel[grid]`` as given."""
    params = list(inspect.signature(kernel.fn).parameters.values())
    const = _constexpr_params(kernel, params)
    ns = {"_T": torch.Tensor, "_spec": _spec}
    names, parts = [], []
    for i, p in enumerate(params):
        a = p.name
        if a.startswith("_") or a in _OPTIONS or p.kind is not p.POSITIONAL_OR_KEYWORD:
            raise ValueError(f"{kernel.fn.__name__}: parameter {a!r} cannot be bound by the "
                             "launch cache (a leading '_' and launch options are its own names)")
        if p.default is inspect.Parameter.empty:
            names.append(a)
        else:
            ns[f"_d{i}"] = p.default
            names.append(f"{a}=_d{i}")
        if i in const:
            parts.append(a)
        else:  # what _spec returns, inline for the two common classes
            parts.append(f"((({a}).dtype, ({a}).data_ptr() & 15 == 0) if ({a}).__class__ is _T "
                         f"else (32, {a} == 1, {a} % 16 == 0) if ({a}).__class__ is int and "
                         f"-2147483648 <= {a} < 2147483648 else _spec({a}, False))")
    options = ", ".join(f"{o}=None" for o in _OPTIONS)
    args = ", ".join(p.name for p in params)
    src = (f"def bind(_kid, _dev, {', '.join(names)}, *, {options}, **_other):\n"
           f"    if _other:\n        return None, None\n"
           f"    return ((_kid, _dev, {', '.join(_OPTIONS)}, {', '.join(parts)}), "
           f"[{args}])\n")
    exec(compile(src, f"<launch binder of {kernel.fn.__name__}>", "exec"), ns)
    return ns["bind"]


def _constexpr_params(kernel, params) -> set:
    """Indices of the constexpr parameters: from a JITFunction's ``params``, else (the
    interpreter's function, for the CPU tests) from the annotations."""
    if hasattr(kernel, "params"):
        return {p.num for p in kernel.params if p.is_constexpr}
    return {i for i, p in enumerate(params) if "constexpr" in str(p.annotation)}


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
    kid = id(kernel)
    bound = _binders.get(kid)
    if bound is None:  # (the kernel is kept with its binder, so its id is never reused)
        bound = _binders[kid] = (kernel, _binder(kernel))
    key, full = bound[1](kid, torch.cuda.current_device(), *args, **kwargs)
    entry = None if key is None else _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None and key is not None:
            _compiled[key] = _entry(compiled)
        return
    # The compiled kernel's launcher takes every argument, constexprs included, and a 3-D grid.
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    if type(entry) is not _Direct:
        entry[grid3](*full)
    elif _direct_ok:
        entry(grid3, key[1], full)
    else:
        _first_direct(entry, grid3, key[1], full)


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
