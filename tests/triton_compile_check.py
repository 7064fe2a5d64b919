"""pytest plugin: compile every interpreted Triton launch for a real GPU as well.

Under TRITON_INTERPRET=1 (how the CPU suite runs the kernels) Triton never compiles: a
kernel that the interpreter accepts can still fail to compile on a GPU (e.g. a global that
is not a constexpr). With this plugin every distinct launch (kernel, argument types,
constexpr values, num_warps) seen during the tests is recorded, and at the end a fresh
process (interpreter off) compiles each one to a cubin for sm_90 with Triton's bundled
toolchain; no GPU needed. Any failure fails the session.

``tests/conftest.py`` registers it whenever triton is installed and no GPU is present, so
``python3 -m pytest -q tests`` runs it (MOE_TRITON_COMPILE_CHECK=0 turns it off).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile

_DT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
       "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
       "bool": "i1"}
_seen: dict = {}


def _record(interp, args, kwargs):
    import torch
    fn = interp.fn
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    sig, consts = {}, {}
    for p in params:
        v = bound.get(p.name, p.default)
        ann = p.annotation
        if getattr(ann, "__name__", str(ann)).endswith("constexpr") or "constexpr" in str(ann):
            sig[p.name] = "constexpr"
            consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _DT[str(v.dtype).replace("torch.", "")]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i64" if abs(v) >= 2 ** 31 else "i32"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif v is None:
            sig[p.name] = "constexpr"
            consts[p.name] = None
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    rec = {"module": fn.__module__, "name": fn.__name__, "sig": sig, "consts": consts, "opts": opts}
    _seen[json.dumps(rec, sort_keys=True, default=str)] = rec


_COMPILER = r'''
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
bad = 0
for rec in json.load(open(sys.argv[1])):
    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    try:
        triton.compile(ASTSource(fn=fn, signature=rec["sig"], constexprs=rec["consts"]),
                       target=GPUTarget("cuda", 90, 32), options=rec["opts"])
    except Exception as exc:
        bad += 1
        print(f"FAILED {rec['name']} {rec['consts']} {rec['opts']}: {type(exc).__name__}: "
              f"{str(exc)[-1500:]}")
print(f"compiled {len(json.load(open(sys.argv[1]))) - bad} variants, {bad} failed")
sys.exit(1 if bad else 0)
'''


def pytest_configure(config):
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interp_mod
    cls = interp_mod.InterpretedFunction
    if getattr(cls, "_compile_recorded", False):
        return
    orig = cls.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            _record(self, args, kwargs)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    cls.run = run
    cls._compile_recorded = True


def pytest_sessionfinish(session, exitstatus):
    if not _seen:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(list(_seen.values()), f, default=str)
    env = dict(os.environ)
    # "0", not unset: test modules that define kernels import triton_mode, which turns the
    # interpreter on (setdefault) on a machine without a GPU.
    env["TRITON_INTERPRET"] = "0"
    # Kernels defined in test modules (tests/) import by module name too.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _COMPILER, f.name], env=env,
                          capture_output=True, text=True)
    os.unlink(f.name)
    session.config._triton_compile_report = proc.stdout + proc.stderr[-3000:]
    if proc.returncode != 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, config):
    rep = getattr(config, "_triton_compile_report", None)
    if rep:
        terminalreporter.write_line("triton compile check (sm_90): " + rep.strip()[-4000:])
