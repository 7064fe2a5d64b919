"""NeMo AutoModel's own MoE code, run on ``moe_dispatch.fused_a2a``, gets the seed's outcomes.

``SeedCaller`` below is the control flow of AutoModel's ``MoEFlexTokenDispatcher`` with its
``_DeepepManager`` / ``_HybridEPManager`` (``nemo_automodel/components/moe/megatron/
token_dispatcher.py``) and ``automodel_teardown`` that of ``destroy_global_state``
(``components/distributed/init_utils.py``), written here from reading them: which names they
import, what they test for None, the calls they make and in what order. They run with the
CPU stand-ins of the libraries (tests/fake_ep.py; all of them, or without UCCL-EP or
HybridEP) and without any library. The module binds the library names at import, as the
seed does, so every test imports it afresh under the libraries it wants (``fake_ep.installed``
re-imports it going in and coming out, leaving the process as it found it).

Multi-rank steps run on the shared gloo pool (tests/dist_pool.py); the rank functions are
the ``rank_*`` functions of this module.
"""
from __future__ import annotations

import contextlib
import importlib.util
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import fake_ep
from moe_dispatch import fused_a2a
from moe_dispatch.backends.deepep import buffer as v1_buffer
from moe_dispatch.backends.hybridep import buffer as hybrid_buffer

# This module, by the name the pool's ranks import it under (tests/ is on their path).
WORKERS = "test_fused_a2a_dropin"
HAVE_REAL_LIBS = any(importlib.util.find_spec(m) is not None for m in ("deep_ep", "uccl"))
needs_no_real_libs = pytest.mark.skipif(HAVE_REAL_LIBS, reason="deep_ep or uccl installed here")

# Which stand-ins a case installs: None = no library at all (the bare process).
LIBS = {"none": None, "all": {}, "no_uccl": {"uccl": False}, "no_hybrid": {"hybrid": False}}
DEFAULT_SMS = 20  # the stand-ins' class-wide SM count, restored after each case


@contextlib.contextmanager
def libraries(libs: str):
    """``fused_a2a`` re-imported with the stand-ins of ``LIBS[libs]`` for the block; every
    buffer made in it is freed and the stand-ins' counters and SM count are restored."""
    kw = LIBS[libs]
    if kw is None and HAVE_REAL_LIBS:
        pytest.skip("a real library is installed here")
    with contextlib.nullcontext() if kw is None else fake_ep.installed(**kw):
        for k in fake_ep.LOG:
            fake_ep.LOG[k] = None if k == "uccl_intranode" else 0
        try:
            yield fused_a2a
        finally:
            v1_buffer.free_all()
            hybrid_buffer.reset_all()
            fake_ep.Buffer.num_sms = DEFAULT_SMS


# --------------------------------------------------------------------------------------
# The caller, as AutoModel writes it


class SeedCaller:
    """AutoModel's flex token dispatcher reduced to what touches ``fused_a2a``.

    fa:             the module (its names are read once, like the caller's
                    ``from .fused_a2a import ...`` at import).
    backend:        "deepep", "uccl_ep" or "hybridep" (``moe_flex_dispatcher_backend``).
    group:          the EP group (only ``size()`` is used to construct).
    num_experts:    E.  num_sms: ``moe_deepep_num_sms``.
    async_dispatch: ``moe_deepep_async_dispatch`` (DeepEP / UCCL-EP only).
    """

    NAMES = ("fused_combine", "fused_dispatch", "hybrid_ep_combine", "hybrid_ep_dispatch",
             "set_deepep_num_sms", "set_uccl_num_sms", "uccl_fused_combine",
             "uccl_fused_dispatch")

    def __init__(self, fa, backend: str, group, num_experts: int, num_sms: int = 24,
                 async_dispatch: bool = False):
        n = {name: getattr(fa, name) for name in self.NAMES}
        self.group, self.E = group, num_experts
        self.L = num_experts // group.size()
        self.backend = backend
        self.async_dispatch = async_dispatch and backend != "hybridep"
        if backend == "hybridep":
            if n["hybrid_ep_dispatch"] is None:
                raise ImportError("HybridEP is not installed")
            self.dispatch_fn, self.combine_fn = n["hybrid_ep_dispatch"], n["hybrid_ep_combine"]
            return
        if backend == "uccl_ep":
            if n["set_uccl_num_sms"] is not None:
                n["set_uccl_num_sms"](num_sms)
            injected = (n["uccl_fused_dispatch"], n["uccl_fused_combine"])
        elif backend == "deepep":
            if n["set_deepep_num_sms"] is not None:
                n["set_deepep_num_sms"](num_sms)
            injected = (None, None)
        else:
            raise ValueError(backend)
        # _DeepepManager: the injected functions, else the module's DeepEP ones; None refused.
        self.dispatch_fn = injected[0] if injected[0] is not None else n["fused_dispatch"]
        self.combine_fn = injected[1] if injected[1] is not None else n["fused_combine"]
        if self.dispatch_fn is None:
            raise ImportError("Neither DeepEP nor UCCL-EP is installed")

    @staticmethod
    def _multihot(idx_NK, probs_NK, width: int):
        """[N, K] ids (-1 = none) and probs -> ([N, width] bool map, [N, width] probs)."""
        N = idx_NK.shape[0]
        map_NW = torch.zeros(N, width, dtype=torch.bool)
        probs_NW = torch.zeros(N, width, dtype=torch.float)
        mask = idx_NK != -1
        rows = torch.arange(N).repeat_interleave(mask.sum(dim=1))
        map_NW[rows, idx_NK[mask]] = True
        probs_NW[rows, idx_NK[mask]] = probs_NK[mask]
        return map_NW, probs_NW

    def forward(self, x_TH, idx_TK, probs_TK, experts):
        """One MoE layer: dispatch, ``experts(rows_NH, local_expert_N)`` on rows grouped by
        local expert and weighted by their probs, combine. Returns [T, H]."""
        if self.backend == "hybridep":
            return self._forward_hybrid(x_TH, idx_TK, probs_TK, experts)
        a = self.async_dispatch
        recv_x, recv_idx, recv_probs, tpe, handle = self.dispatch_fn(
            x_TH, idx_TK, probs_TK.float(), self.E, self.group, async_finish=a,
            allocate_on_comm_stream=a)
        map_NL, probs_NL = self._multihot(recv_idx, recv_probs, self.L)
        # Megatron's permute: rows in local-expert order, tokens_per_expert.sum() of them.
        lid_M, row_M = torch.nonzero(map_NL.t(), as_tuple=True)
        assert row_M.numel() == int(tpe.sum().item())
        out_MH = experts(recv_x[row_M], lid_M) * probs_NL[row_M, lid_M].unsqueeze(1)
        restored_NH = torch.zeros(recv_x.shape, dtype=torch.float).index_add(0, row_M, out_MH)
        y_TH, _ = self.combine_fn(restored_NH.to(recv_x.dtype), self.group, handle,
                                  async_finish=a, allocate_on_comm_stream=a)
        return y_TH

    def _forward_hybrid(self, x_TH, idx_TK, probs_TK, experts):
        map_TE, probs_TE = self._multihot(idx_TK, probs_TK, self.E)
        tokens_NH, probs_N, _, tpe, handle = self.dispatch_fn(
            x=x_TH, routing_map=map_TE, probs=probs_TE, group=self.group,
            num_local_experts=self.L, num_sms_dispatch_api=24, num_sms_combine_api=24,
            num_permuted_tokens=None, pad_multiple=None)
        num_permuted_tokens = tpe.sum()
        lid_N = torch.arange(self.L).repeat_interleave(tpe.long())
        out_NH = experts(tokens_NH, lid_N) * probs_N.unsqueeze(1)
        return self.combine_fn(x=out_NH.to(x_TH.dtype), handle=handle,
                               num_permuted_tokens=num_permuted_tokens, pad_multiple=None)


def automodel_teardown(fa) -> None:
    """destroy_global_state: free the DeepEP buffer first, best effort (it imports
    ``free_buffer`` when called); ``destroy_process_group`` would follow (not here: the
    pool's group stays)."""
    try:
        fa.free_buffer()
    except Exception:
        pass


class Group:
    """Stand-in EP group for constructing the caller (it only asks the size)."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


# --------------------------------------------------------------------------------------
# Import time: which names exist, and what the caller makes of them


LIBRARY_NAMES = {"deep_ep": ("Buffer", "EventHandle", "EventOverlap"),
                 "hybrid": ("HybridEPBuffer",),
                 "uccl": ("UCCLBuffer", "UCCLEventHandle", "UCCLEventOverlap")}
BOUND = {"deep_ep": ("fused_dispatch", "fused_combine", "set_deepep_num_sms"),
         "hybrid": ("hybrid_ep_dispatch", "hybrid_ep_combine"),
         "uccl": ("uccl_fused_dispatch", "uccl_fused_combine", "set_uccl_num_sms")}
PRESENT = {"none": (), "all": ("deep_ep", "hybrid", "uccl"), "no_uccl": ("deep_ep", "hybrid"),
           "no_hybrid": ("deep_ep", "uccl")}


@pytest.mark.parametrize("libs", list(LIBS))
def test_names_follow_the_libraries(libs):
    with libraries(libs) as fa:
        present = PRESENT[libs]
        assert (fa.HAVE_DEEP_EP, fa.HAVE_HYBRIDEP, fa.HAVE_UCCL_EP) == tuple(
            lib in present for lib in ("deep_ep", "hybrid", "uccl"))
        for lib in BOUND:
            for name in BOUND[lib]:
                assert (getattr(fa, name) is not None) == (lib in present), name
            for name in LIBRARY_NAMES[lib]:
                assert hasattr(fa, name) == (lib in present), name
        if "deep_ep" in present:
            assert fa.Buffer is fake_ep.Buffer
            assert (fa.EventHandle, fa.EventOverlap) == (fake_ep.EventHandle, fake_ep.EventOverlap)
        if "hybrid" in present:
            assert fa.HybridEPBuffer is fake_ep.HybridEPBuffer
        if "uccl" in present:
            assert fa.UCCLBuffer is fake_ep.UCCLBuffer
            assert fa.UCCLEventHandle is fake_ep.EventHandle
            assert fa.UCCLEventOverlap is fake_ep.EventOverlap
        assert fa._buffer is fa._uccl_buffer is fa._hybrid_ep_buffer is None


def test_uccl_sm_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("UCCL_EP_SM_NUMS", "32")
    with libraries("all") as fa:
        assert fa.UCCLBuffer.num_sms == 32  # set at import, as the seed does


# (libs, backend) -> the dispatch function the caller ends up with, or ImportError.
CONSTRUCT = {
    ("none", "deepep"): ImportError, ("none", "uccl_ep"): ImportError,
    ("none", "hybridep"): ImportError,
    ("all", "deepep"): "fused_dispatch", ("all", "uccl_ep"): "uccl_fused_dispatch",
    ("all", "hybridep"): "hybrid_ep_dispatch",
    # Without UCCL-EP the caller falls back to DeepEP (its own choice; the seed module only
    # offers None), without HybridEP it refuses.
    ("no_uccl", "uccl_ep"): "fused_dispatch", ("no_hybrid", "hybridep"): ImportError,
}


@pytest.mark.parametrize("libs,backend", list(CONSTRUCT))
def test_caller_constructs_as_on_the_seed(libs, backend):
    want = CONSTRUCT[libs, backend]
    with libraries(libs) as fa:
        if want is ImportError:
            with pytest.raises(ImportError):
                SeedCaller(fa, backend, Group(2), 8, num_sms=24)
            return
        caller = SeedCaller(fa, backend, Group(2), 8, num_sms=24)
        assert caller.dispatch_fn is getattr(fa, want)
        # set_*_num_sms ran only where it is not None (the stand-ins share one SM count).
        sms_set = backend == "deepep" or (backend == "uccl_ep" and libs != "no_uccl")
        assert fake_ep.Buffer.num_sms == (24 if sms_set else DEFAULT_SMS)


# --------------------------------------------------------------------------------------
# Teardown and error types (AutoModel's own unit tests of free_buffer, and more)


@pytest.mark.parametrize("libs", ["none", "all"])
def test_free_buffer_destroys_whatever_buffer_holds(libs):
    with libraries(libs) as fa:
        sentinel = mock.MagicMock()
        fa._buffer = sentinel
        automodel_teardown(fa)
        sentinel.destroy.assert_called_once_with()
        assert fa._buffer is None

        boom = mock.MagicMock()
        boom.destroy.side_effect = RuntimeError("`explicitly_destroy` flag must be set")
        fa._buffer = boom
        fa.free_buffer()  # swallowed
        boom.destroy.assert_called_once_with()
        assert fa._buffer is None

        fa.free_buffer()  # nothing to free
        assert fa._buffer is None


@pytest.mark.parametrize("libs", ["none", "all"])
def test_error_types_are_the_seeds(libs):
    with libraries(libs) as fa:
        with pytest.raises(AssertionError):
            fa.init_hybrid_ep_buffer(None, 16, 8, 4, 24, 24, True)
        x = torch.zeros(4, 16, dtype=torch.bfloat16)
        with pytest.raises(AttributeError):  # no HybridEP buffer: the seed's None.combine...
            fa.HybridEPCombine.apply(x, None)
        if libs == "all":
            with pytest.raises(AttributeError):
                fa.hybrid_ep_combine(x, None)
        fa.reset_hybrid_ep_buffer()
        assert fa._hybrid_ep_buffer is None


def test_more_than_eight_ranks_without_nvshmem_is_a_runtime_error(monkeypatch):
    with libraries("all") as fa:
        # A 16-rank group, as far as sizing is concerned; the stand-in has no NVSHMEM.
        monkeypatch.setattr(v1_buffer.comm, "group_size", lambda group: 16)
        monkeypatch.setitem(fake_ep._DISPATCH, 16, 6)
        monkeypatch.setitem(fake_ep._COMBINE, 16, 4)
        with pytest.raises(RuntimeError, match="NVSHMEM"):
            fa.get_buffer(Group(16), 4096)
        assert fa._is_nvshmem_available() is False and fa._nvshmem_available is False


# --------------------------------------------------------------------------------------
# Whole layers on two gloo ranks


def _case(rank: int, T: int, H: int, E: int, K: int, masked: bool):
    g = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).requires_grad_(True)
    idx = torch.rand(T, E, generator=g).argsort(1)[:, :K].contiguous()
    if masked:
        idx[::3, 0] = -1  # capacity-dropped slots
    probs = torch.rand(T, K, generator=g).requires_grad_(True)
    return x, idx, probs, torch.randn(T, H, generator=g)


def _two_layers_reference(x, idx, probs, g_out):
    """experts(row, e) = row * (e + 1), two layers with a 1/8 between them:
    y = x * s^2 / 8 with s = sum_k p_k (e_k + 1). Returns y and the gradients of
    (y * g_out).sum() to x and probs (dense, by autograd)."""
    p = probs.detach().clone().requires_grad_(True)
    scale_TK = torch.where(idx >= 0, (idx + 1).float(), 0.0)
    s_T = (p * scale_TK).sum(1, keepdim=True)
    y = x.detach().float() * s_T * s_T / 8
    (y * g_out).sum().backward()
    return y.detach(), g_out * (s_T * s_T / 8).detach(), p.grad


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


def rank_caller(rank, world, libs, backend, async_dispatch):
    """Two layers sharing one dispatcher (AutoModel's shared manager), two steps, teardown."""
    T, H, E, K = 9, 16, 8, 2
    with libraries(libs) as fa:
        group = dist.group.WORLD
        caller = SeedCaller(fa, backend, group, E, num_sms=24, async_dispatch=async_dispatch)
        offset = rank * caller.L

        def experts(rows_NH, local_N):
            return rows_NH.float() * (offset + local_N + 1).unsqueeze(1).float()

        errs = []
        for step in range(2):
            x, idx, probs, g_out = _case(rank + 10 * step, T, H, E, K,
                                         masked=backend != "hybridep")
            y = caller.forward(caller.forward(x, idx, probs, experts) / 8, idx, probs, experts)
            (y.float() * g_out).sum().backward()
            y_ref, gx_ref, gp_ref = _two_layers_reference(x, idx, probs, g_out)
            errs += [_rel(y, y_ref), _rel(x.grad, gx_ref), _rel(probs.grad, gp_ref)]
        state = dict(buffer=fa._buffer is not None, uccl_buffer=fa._uccl_buffer is not None,
                     hybrid_buffer=fa._hybrid_ep_buffer is not None, log=dict(fake_ep.LOG),
                     num_sms=fake_ep.Buffer.num_sms)
        automodel_teardown(fa)
        state.update(after_teardown=fa._buffer, log_after=dict(fake_ep.LOG),
                     uccl_after=fa._uccl_buffer is not None)
        return dict(errs=errs, **state)


RUNS = [("all", "deepep", False), ("all", "deepep", True), ("all", "uccl_ep", False),
        ("all", "uccl_ep", True), ("no_uccl", "uccl_ep", False), ("all", "hybridep", False)]


@pytest.mark.parametrize("libs,backend,async_dispatch", RUNS)
def test_caller_runs_layers_and_teardown(gloo_pool, libs, backend, async_dispatch):
    res = gloo_pool(2).run(WORKERS, "rank_caller", libs, backend, async_dispatch)
    uses = {"deepep": "deep_ep", "uccl_ep": "uccl" if libs == "all" else "deep_ep",
            "hybridep": "hybrid"}[backend]
    for out in res:
        assert max(out["errs"]) < 3e-2, out["errs"]
        # One buffer for both layers and both steps, kept in the library's global.
        assert (out["buffer"], out["uccl_buffer"], out["hybrid_buffer"]) == (
            uses == "deep_ep", uses == "uccl", uses == "hybrid")
        if uses == "hybrid":
            assert out["log"]["hybrid_built"] == 1 and out["log"]["built"] == 0
        else:
            assert out["log"]["built"] == 1
        if uses == "uccl":
            assert out["log"]["uccl_intranode"] is True
        # The SM count is set through set_*_num_sms of the backend asked for, where not None:
        # uccl_ep without UCCL-EP runs on DeepEP with its default count, as on the seed.
        sms_set = backend == "deepep" or (backend == "uccl_ep" and libs == "all")
        assert out["num_sms"] == (24 if sms_set else DEFAULT_SMS)
        # AutoModel's teardown frees the DeepEP buffer only (as the seed: UCCL's stays).
        assert out["after_teardown"] is None
        assert out["log_after"]["destroyed"] == (1 if uses == "deep_ep" else 0)
        assert out["uccl_after"] == (uses == "uccl")


def rank_buffers(rank, world):
    """The globals as live state: assigned buffers used, patched get_buffer reached, one
    buffer per group, owners' growth and frees followed."""
    H, E = 16, 8
    out = {}
    with libraries("all") as fa:
        group = dist.group.WORLD
        x, idx, probs, _ = _case(rank, 6, H, E, 2, masked=False)
        hb = fa.get_hidden_bytes(x)

        # get_buffer reuses its buffer, and the global is it.
        b1 = fa.get_buffer(group, hb)
        out["reused"] = fa.get_buffer(group, hb) is b1 and fa._buffer is b1

        # An owner (e.g. the deepep backend) grows the group's buffer: the global follows.
        b2 = v1_buffer.manager_for(v1_buffer.DEEP_EP, group).get(4 * hb)
        out["followed_growth"] = fa._buffer is b2 and b1.destroyed
        v1_buffer.free_all()
        out["followed_free"] = fa._buffer is None and b2.destroyed

        # A buffer assigned to _buffer is used by dispatch and combine, then destroyed by
        # free_buffer.
        built = fake_ep.LOG["built"]
        mine = fa.Buffer(group, b2.num_nvl_bytes, 0, explicitly_destroy=True)
        fa._buffer = mine
        recv, _, _, _, handle = fa.fused_dispatch(x, idx, probs, E, group)
        fa.fused_combine(recv, group, handle)
        out["assigned_used"] = fa._buffer is mine and fake_ep.LOG["built"] == built + 1
        fa.free_buffer()
        out["assigned_freed"] = mine.destroyed and fa._buffer is None

        # A patched get_buffer is what the Functions call, forward and backward.
        calls = []
        real = fa.get_buffer
        fa.get_buffer = lambda g, n: calls.append(n) or real(g, n)
        try:
            recv, _, p_recv, _, handle = fa.fused_dispatch(x, idx, probs, E, group)
            y, _ = fa.fused_combine(recv * 1, group, handle)
            (y.float().sum() + p_recv.sum()).backward()
        finally:
            fa.get_buffer = real
        out["patched_calls"] = len(calls)

        # Another group gets its own buffer; the first group's is kept for it.
        other = dist.new_group(list(range(world)))
        b_world = fa.get_buffer(group, hb)
        b_other = fa.get_buffer(other, hb)
        out["per_group"] = (b_other is not b_world and fa._buffer is b_other
                            and fa.get_buffer(group, hb) is b_world and not b_world.destroyed)
        fa.free_buffer()
        out["all_freed"] = b_world.destroyed and b_other.destroyed and fa._buffer is None

        # The same for UCCL-EP's global.
        u_mine = fa.UCCLBuffer(group, b2.num_nvl_bytes, 0, explicitly_destroy=True,
                               is_intranode=True)
        fa._uccl_buffer = u_mine
        recv, _, _, _, handle = fa.uccl_fused_dispatch(x, idx, probs, E, group)
        fa.uccl_fused_combine(recv, group, handle)
        out["uccl_assigned_used"] = fa._uccl_buffer is u_mine
        fa._uccl_buffer = None
        u1 = fa.get_uccl_buffer(group, hb)
        out["uccl_reused"] = fa.get_uccl_buffer(group, hb) is u1 and fa._uccl_buffer is u1

        # And HybridEP's: an assigned buffer is dispatched on; reset drops it.
        h_mine = fa.HybridEPBuffer(group=group, hidden_dim=H, max_num_of_tokens_per_rank=6,
                                   num_local_experts=E // world)
        fa._hybrid_ep_buffer = h_mine
        rm, pr = SeedCaller._multihot(idx, probs.detach(), E)
        built = fake_ep.LOG["hybrid_built"]
        tok, _, _, tpe, handle = fa.hybrid_ep_dispatch(x, rm, pr, group, E // world)
        fa.hybrid_ep_combine(tok, handle, num_permuted_tokens=tpe.sum())
        out["hybrid_assigned_used"] = (fa._hybrid_ep_buffer is h_mine
                                       and fake_ep.LOG["hybrid_built"] == built)
        fa.reset_hybrid_ep_buffer()
        out["hybrid_reset"] = fa._hybrid_ep_buffer is None
        return out


def test_globals_are_the_live_state(gloo_pool):
    for out in gloo_pool(2).run(WORKERS, "rank_buffers"):
        assert out.pop("patched_calls") == 4  # dispatch, combine, and their backwards
        assert all(out.values()), out
