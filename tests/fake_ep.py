"""CPU stand-ins for the GPU-only libraries, to exercise the adapters on gloo ranks.

They imitate the documented Python contracts of DeepEP V1's ``Buffer`` (tag v1.2.1),
UCCL-EP's V1-compatible ``Buffer`` (adds ``is_intranode``) and HybridEP's
``HybridEPBuffer`` (hybrid-ep branch), moving data with real torch.distributed
collectives, so multi-rank semantics (receive order, local expert ids, -1 slots, combine
as a sum over ranks, cached-layout dispatch) are exercised for real. They also enforce
the constraints the real libraries impose (BF16-only combine, 16-byte rows, even SM
counts, equal token counts for HybridEP) and the sync-free modes' hazards: DeepEP's
``num_worst_tokens`` returns that many rows with NaN (uninitialised) rows past the received
ones, -1 top-k ids there and no per-expert counts; HybridEP's ``num_permuted_tokens``
leaves NaN rows past the used ones and drops (and flags) rows over the limit only in its
fused non-blocking permute (elsewhere that is an out-of-bounds write: an assertion here).
The real libraries are proven on GPUs by tests/test_gpu_backends.py.

``install()`` puts them in ``sys.modules`` as ``deep_ep`` (with ``HybridEPBuffer``) and
``uccl`` / ``uccl.ep``; ``uninstall()`` puts back what was there. Both re-import
``moe_dispatch.fused_a2a`` if it is loaded, since it binds the libraries' names at import
(as NeMo AutoModel's module does). ``installed()`` does both around a block.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch
import torch.distributed as dist

from moe_dispatch import comm
from moe_dispatch.backends.deepep.buffer import nvl_size_hint

LOG = {"built": 0, "destroyed": 0, "uccl_intranode": None, "hybrid_built": 0}


class EventHandle:
    """DeepEP's ``deep_ep_cpp.EventHandle`` (records the current stream; nothing here)."""


class EventOverlap:
    def __init__(self, event=None, extra_tensors=None):
        self.event = event

    def current_stream_wait(self):
        pass


class Config:
    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6,
                 num_max_nvl_chunked_recv_tokens=256, num_max_rdma_chunked_send_tokens=6,
                 num_max_rdma_chunked_recv_tokens=256):
        assert num_sms >= 0
        assert 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens
        self.num_sms = num_sms
        self.recv = num_max_nvl_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        return nvl_size_hint(self.num_sms, self.recv, hidden_bytes, num_ranks, nvshmem=False)

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        raise RuntimeError("Assertion failed: NVSHMEM is disable during compilation")


_DISPATCH = {2: 24, 4: 6, 8: 6}
_COMBINE = {2: 10, 4: 9, 8: 4}


class Buffer:
    # The stand-in has no small-row limit (the real DeepEP V1 gets MIN_ROW_BYTES).
    min_row_bytes = 16
    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
                 num_qps_per_rank=24, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                 explicitly_destroy=False, comm=None):
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.explicitly_destroy = explicitly_destroy
        self.destroyed = False
        assert num_nvl_bytes % 128 == 0
        dist.barrier(group=group)  # construction exchanges IPC handles: collective
        LOG["built"] += 1

    def destroy(self):
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        assert not self.destroyed
        dist.barrier(group=self.group)
        self.destroyed = True
        LOG["destroyed"] += 1

    @staticmethod
    def is_sm90_compiled():
        return True

    @staticmethod
    def set_num_sms(new_num_sms):
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture():
        return EventOverlap(object())

    @staticmethod
    def get_dispatch_config(num_ranks):
        assert num_ranks in _DISPATCH, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, _DISPATCH[num_ranks], 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks):
        assert num_ranks in _COMBINE, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, _COMBINE[num_ranks], 256, 6, 128)

    def _need(self, hidden_bytes, config):
        assert not self.destroyed
        need = config.get_nvl_buffer_size_hint(hidden_bytes, self.group_size)
        assert need <= self.num_nvl_bytes, f"buffer too small: {need} > {self.num_nvl_bytes}"
        assert config.num_sms % 2 == 0

    @staticmethod
    def _events(previous_event, async_finish, allocate_on_comm_stream):
        # Like DeepEP: an EventOverlap without an event counts as no previous event.
        event = getattr(previous_event, "event", None)
        if allocate_on_comm_stream:
            assert event is not None and async_finish
        if event is not None:
            assert async_finish

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        self._events(previous_event, async_finish, allocate_on_comm_stream)
        assert topk_idx.dtype == torch.int64 and topk_idx.dim() == 2 and topk_idx.is_contiguous()
        R, L = self.group_size, num_experts // self.group_size
        valid = topk_idx >= 0
        rank_TK = torch.where(valid, topk_idx // L, R)
        in_rank = torch.zeros(topk_idx.shape[0], R + 1, dtype=torch.bool)
        in_rank.scatter_(1, rank_TK, True)
        in_rank = in_rank[:, :R].contiguous()
        per_expert = torch.zeros(num_experts + 1, dtype=torch.int32)
        per_expert.scatter_add_(0, torch.where(valid, topk_idx, num_experts).reshape(-1),
                                torch.ones(topk_idx.numel(), dtype=torch.int32))
        return (in_rank.sum(0).to(torch.int32), None, per_expert[:num_experts], in_rank,
                EventOverlap(object() if async_finish else None))

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None,
                 topk_weights=None, expert_alignment=1, num_worst_tokens=0, config=None,
                 previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        self._events(previous_event, async_finish, allocate_on_comm_stream)
        config = config or self.get_dispatch_config(self.group_size)
        assert x.dim() == 2 and x.is_contiguous()
        assert (x.size(1) * x.element_size()) % 16 == 0
        self._need(x.size(1) * max(x.element_size(), 2), config)
        R, g = self.group_size, self.group
        ev = EventOverlap(object() if async_finish else None)
        if handle is not None:
            assert topk_idx is None and topk_weights is None
            send, recv, order, _in_rank, _T, rows = handle
            recv_x = comm.all_to_all_raw(x.index_select(0, order), list(recv), list(send), g)
            return _junk_rows(recv_x, rows), None, None, None, None, ev
        assert num_tokens_per_rank is not None and is_token_in_rank is not None
        assert num_tokens_per_expert is not None
        assert topk_weights.dtype == torch.float32 and topk_weights.is_contiguous()
        T, K = topk_idx.shape
        # The kernel copies a token's top-k slots with the lanes of one warp.
        assert K <= 32, f"num_topk {K} > 32: slots past 32 would not be copied"
        if num_worst_tokens:  # "Internode dispatch does not support `num_worst_tokens > 0`"
            assert R <= 8 and topk_idx is not None
        E = num_tokens_per_expert.numel()
        L = E // R
        # rows for each destination, token order
        dest = torch.arange(R).repeat_interleave(is_token_in_rank.sum(0))
        order = torch.cat([torch.nonzero(is_token_in_rank[:, r]).reshape(-1) for r in range(R)]) \
            if T else torch.zeros(0, dtype=torch.long)
        lo = (dest * L).unsqueeze(1)
        idx_s = topk_idx.index_select(0, order)
        local = (idx_s >= lo) & (idx_s < lo + L)
        lid = torch.where(local, idx_s - lo, -1)
        w = torch.where(local, topk_weights.index_select(0, order), 0.0)
        send = num_tokens_per_rank.to(torch.long).tolist()
        counts = comm.exchange_ints(torch.tensor(send, dtype=torch.long).view(R, 1), g)
        recv = counts.view(-1).tolist()
        per_exp = comm.exchange_ints(num_tokens_per_expert.to(torch.long).view(R, L), g)
        tpe = per_exp.sum(0).tolist()
        tpe = [-(-c // expert_alignment) * expert_alignment for c in tpe]
        recv_x = comm.all_to_all_raw(x.index_select(0, order), recv, send, g)
        recv_idx = comm.all_to_all_raw(lid.contiguous(), recv, send, g)
        recv_w = comm.all_to_all_raw(w.contiguous(), recv, send, g)
        rows = None
        if num_worst_tokens:
            # No host wait: N rows allocated, only the received ones written (the rest is
            # uninitialised: NaN here), top-k ids cleaned to -1 there, the count list empty.
            assert sum(recv) <= num_worst_tokens, "received rows past num_worst_tokens: OOB"
            rows, tpe = num_worst_tokens, []
            recv_x, recv_w = _junk_rows(recv_x, rows), _junk_rows(recv_w, rows)
            recv_idx = torch.cat([recv_idx, recv_idx.new_full((rows - sum(recv), K), -1)])
        handle = (tuple(send), tuple(recv), order, is_token_in_rank, T, rows)
        return recv_x, recv_idx, recv_w, tpe, handle, ev

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        self._events(previous_event, async_finish, allocate_on_comm_stream)
        config = config or self.get_combine_config(self.group_size)
        assert x.dtype == torch.bfloat16, "Unsupported type"  # V1 combine reduces BF16 only
        assert x.dim() == 2 and x.is_contiguous()
        self._need(x.size(1) * 2, config)
        send, recv, order, _in_rank, T, rows = handle
        # Like DeepEP: as many rows as the dispatch received (num_worst_tokens if set), of
        # which only the received ones are read.
        assert x.shape[0] == (rows or sum(recv))
        x = x[:sum(recv)]
        topk_weights = None if topk_weights is None else topk_weights[:sum(recv)]
        back = comm.all_to_all_raw(x, list(send), list(recv), self.group)
        out = torch.zeros(T, x.shape[1], dtype=torch.float32).index_add(0, order, back.float())
        out_w = None
        if topk_weights is not None:
            assert topk_weights.dtype == torch.float32
            wb = comm.all_to_all_raw(topk_weights.contiguous(), list(send), list(recv), self.group)
            out_w = torch.zeros(T, topk_weights.shape[1]).index_add(0, order, wb)
        return out.to(torch.bfloat16), out_w, EventOverlap(object() if async_finish else None)


def _junk_rows(t, rows):
    """``t`` [n, ...] followed by NaN rows up to ``rows`` (None: ``t`` as is): what DeepEP's
    uninitialised rows past the received ones may hold."""
    if rows is None:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0],) + tuple(t.shape[1:]), float("nan"))])


class UCCLBuffer(Buffer):
    """UCCL-EP's Buffer: the V1 API plus ``is_intranode``."""

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
                 num_qps_per_rank=24, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                 explicitly_destroy=False, is_intranode=False):
        LOG["uccl_intranode"] = is_intranode
        if is_intranode:
            assert num_rdma_bytes == 0
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                         num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl,
                         explicitly_destroy)


class HybridEPBuffer:
    """HybridEP's buffer: dispatch with fused permute from a dense routing map."""

    def __init__(self, group, hidden_dim, max_num_of_tokens_per_rank, num_local_experts,
                 use_fp8=False, num_sms_dispatch_api=None, num_sms_combine_api=None,
                 num_sms_preprocessing_api=None, num_blocks_permute=None,
                 num_blocks_unpermute=None, load_cached_kernels=False, use_shared_buffer=True,
                 enable_custom_allgather=False):
        self.group, self.rank, self.R = group, group.rank(), group.size()
        self.L = num_local_experts
        self.max_tokens = max_num_of_tokens_per_rank
        dist.barrier(group=group)
        LOG["hybrid_built"] += 1

    def _gather(self, t):
        return comm.all_gather_raw(t.contiguous(), self.group)

    def dispatch_with_permute(self, *, hidden, topk_idx=None, topk_weights=None,
                              num_of_experts_per_rank=None, num_of_experts=None, use_fp8=None,
                              routing_map=None, probs=None, scaling_factor=None,
                              num_permuted_tokens=None, pad_multiple=None, handle=None,
                              non_blocking=False, fuse_permute_dispatch=False,
                              num_dispatched_tokens=None, use_host_meta=None):
        assert hidden.element_size() == 2
        T, H = hidden.shape
        if non_blocking:
            assert num_permuted_tokens is not None and num_permuted_tokens >= 0
            if pad_multiple:
                assert num_permuted_tokens % pad_multiple == 0
        Ts = comm.gather_ints(torch.tensor([T]), self.group).view(-1).tolist()
        # The routing maps are all-gathered as equal blocks.
        assert all(t == Ts[0] for t in Ts), f"unequal token counts {Ts}"
        self.max_tokens = max(self.max_tokens, T)
        x_all = self._gather(hidden)
        if handle is None:
            assert routing_map.dtype == torch.bool and routing_map.shape[0] == T
            E = routing_map.shape[1]
            assert E == self.L * self.R
            full = self._gather(routing_map)
            # Tokens routed to some expert: the ones combine writes (even when the token drop
            # of a sync-free dispatch left a token no row).
            routed_all = full.any(1)
            m_all = full[:, self.rank * self.L:(self.rank + 1) * self.L]
            p_all = self._gather(probs)[:, self.rank * self.L:(self.rank + 1) * self.L] \
                if probs is not None else None
            gids, lids, counts = [], [], []
            for l in range(self.L):
                g = torch.nonzero(m_all[:, l]).reshape(-1)
                n = g.numel()
                padn = (-n) % pad_multiple if pad_multiple else 0
                gids.append(torch.cat([g, torch.full((padn,), -1, dtype=torch.long)]))
                lids.append(torch.full((n + padn,), l, dtype=torch.long))
                counts.append(n + padn)
            gid = torch.cat(gids)
            lid = torch.cat(lids)
            # Like the library: the flag is uninitialised memory unless the guard runs.
            overflow = torch.full((1,), -7, dtype=torch.int32)
            tpe = torch.tensor(counts, dtype=torch.long)
            if num_permuted_tokens is not None:
                n = num_permuted_tokens
                over = gid.numel() > n
                # The hybrid-ep head drops rows past num_permuted_tokens (and sets the flag)
                # only in its fused permute of a non-blocking dispatch; otherwise they are
                # written out of bounds.
                assert fuse_permute_dispatch and non_blocking or not over, \
                    "rows past num_permuted_tokens written out of bounds (no token drop)"
                if fuse_permute_dispatch and non_blocking:
                    overflow[0] = int(over)
                    start = torch.cumsum(tpe, 0) - tpe
                    tpe = torch.minimum(tpe, (n - start).clamp(min=0))
                # Rows past the used ones: -2 (never written: uninitialised in the library).
                gid = torch.cat([gid, torch.full((max(n - gid.numel(), 0),), -2,
                                                 dtype=torch.long)])[:n]
                lid = torch.cat([lid, torch.zeros(max(n - lid.numel(), 0),
                                                  dtype=torch.long)])[:n]
            handle = (gid, lid, T, routed_all, None, None, None, None, T, None, overflow)
        else:
            gid, lid = handle[0], handle[1]
            assert num_permuted_tokens == gid.numel()
            p_all, tpe = None, None
        ok = gid >= 0
        # Padding rows (gid -1) are zeros; rows never written (gid -2) hold garbage (NaN).
        fill = torch.where(gid == -1, 0.0, float("nan"))
        tokens = torch.where(ok.unsqueeze(1), x_all.index_select(0, gid.clamp(min=0)),
                             fill.unsqueeze(1).to(hidden.dtype))
        out_p = None
        if p_all is not None:
            out_p = torch.where(ok, p_all[gid.clamp(min=0), lid], fill).float()
        return tokens, out_p, None, tpe, handle

    def combine_with_unpermute(self, *, hidden, probs=None, handle=None, pad_multiple=None,
                               fuse_unpermute_combine=False, num_dispatched_tokens=None):
        assert hidden.element_size() == 2
        gid, lid, T = handle[0], handle[1], handle[2]
        assert hidden.shape[0] == gid.numel()
        ok = gid >= 0
        acc = torch.zeros(T * self.R, hidden.shape[1], dtype=torch.float32)
        acc.index_add_(0, gid[ok], hidden[ok].float())
        dist.all_reduce(acc, group=self.group)
        # The library allocates the output uninitialised and writes only tokens routed
        # somewhere: unrouted rows are garbage (NaN here, so a caller relying on them fails).
        unrouted = ~handle[3][self.rank * T:(self.rank + 1) * T].unsqueeze(1)
        out = acc[self.rank * T:(self.rank + 1) * T].masked_fill(unrouted, float("nan"))
        out = out.to(hidden.dtype)
        out_p = None
        if probs is not None:
            E = self.L * self.R
            pacc = torch.zeros(T * self.R, E)
            pacc.index_put_((gid[ok], lid[ok] + self.rank * self.L), probs[ok].float(),
                            accumulate=True)
            dist.all_reduce(pacc, group=self.group)
            out_p = pacc[self.rank * T:(self.rank + 1) * T].masked_fill(unrouted, float("nan"))
        return out, out_p


class HybridEPBuffer2eec484(HybridEPBuffer):
    """The older hybrid-ep API (commit 2eec484): ``use_host_meta`` instead of
    ``non_blocking``, no ``use_shared_buffer`` argument, an 8-field handle without the
    overflow flag, tokens_per_expert int32. Its hazards fail loudly here: ``pad_multiple``
    None/0 (the permute preprocessing divides by it), more rows than ``num_permuted_tokens``
    (written out of bounds), a token count that is not a multiple of the 128-token chunk
    (a static_assert of the JIT build), hidden not a multiple of 512 (invalid config)."""

    def __init__(self, group, hidden_dim, max_num_of_tokens_per_rank, num_local_experts,
                 use_fp8=False, num_sms_dispatch_api=None, num_sms_combine_api=None,
                 num_sms_preprocessing_api=None, use_mnnvl=None, ib_dev_name_list=[]):
        assert hidden_dim % 512 == 0, f"hidden_dim {hidden_dim} not a multiple of 512"
        assert max_num_of_tokens_per_rank % 128 == 0, max_num_of_tokens_per_rank
        super().__init__(group, hidden_dim, max_num_of_tokens_per_rank, num_local_experts,
                         use_fp8, num_sms_dispatch_api, num_sms_combine_api)

    def dispatch_with_permute(self, *, hidden, topk_idx=None, topk_weights=None,
                              num_of_experts_per_rank=None, num_of_experts=None, use_fp8=None,
                              routing_map=None, probs=None, scaling_factor=None,
                              num_dispatched_tokens=None, num_permuted_tokens=None,
                              pad_multiple=None, handle=None, use_host_meta=True):
        assert pad_multiple, "pad_multiple None/0: division by zero in permute_processing"
        T, H = hidden.shape
        assert H % 512 == 0 and max(T, self.max_tokens) % 128 == 0, (T, H)
        full = None if handle is None else handle + (None, None, None)
        tokens, out_p, scale, tpe, full = super().dispatch_with_permute(
            hidden=hidden, routing_map=routing_map, probs=probs,
            num_permuted_tokens=num_permuted_tokens, pad_multiple=pad_multiple, handle=full)
        # (More rows than num_permuted_tokens fail in the base class: no guard here.)
        if tpe is not None:
            tpe = tpe.to(torch.int32)
        return tokens, out_p, scale, tpe, full[:8]

    def combine_with_unpermute(self, *, hidden, probs=None, num_dispatched_tokens=None,
                               handle=None, pad_multiple=None):
        assert hidden.shape[1] % 512 == 0
        return super().combine_with_unpermute(hidden=hidden, probs=probs,
                                              handle=handle + (None, None, None))


_NAMES = ("deep_ep", "deep_ep.utils", "uccl", "uccl.ep")
_saved = {}


def install(hybrid: bool = True, uccl: bool = True, hybrid_api: str = "current") -> None:
    """hybrid_api: "current" (hybrid-ep head) or "2eec484" (the older use_host_meta API)."""
    for name in _NAMES:
        _saved.setdefault(name, sys.modules.get(name))
    mod = types.ModuleType("deep_ep")
    mod.Buffer, mod.Config, mod.EventOverlap = Buffer, Config, EventOverlap
    utils = types.ModuleType("deep_ep.utils")
    utils.EventHandle, utils.EventOverlap = EventHandle, EventOverlap
    mod.utils = utils
    if hybrid:
        mod.HybridEPBuffer = HybridEPBuffer2eec484 if hybrid_api == "2eec484" else HybridEPBuffer
    sys.modules["deep_ep"], sys.modules["deep_ep.utils"] = mod, utils
    if uccl:
        pkg = types.ModuleType("uccl")
        ep = types.ModuleType("uccl.ep")
        ep.Buffer, ep.Config = UCCLBuffer, Config
        ep.EventHandle, ep.EventOverlap = EventHandle, EventOverlap
        pkg.ep = ep
        sys.modules["uccl"], sys.modules["uccl.ep"] = pkg, ep
    _rebind_seed_module()


def uninstall() -> None:
    for name in _NAMES:
        prev = _saved.pop(name, None)
        if prev is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = prev
    _rebind_seed_module()


@contextlib.contextmanager
def installed(**kw):
    """The stand-ins for the block (``install``'s arguments), then what was there before."""
    install(**kw)
    try:
        yield
    finally:
        uninstall()


def _rebind_seed_module() -> None:
    mod = sys.modules.get("moe_dispatch.fused_a2a")
    if mod is not None:
        importlib.reload(mod)
