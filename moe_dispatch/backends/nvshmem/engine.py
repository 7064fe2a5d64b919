"""``nvshmem``: fused dispatch/combine over torch symmetric memory (no extra install).

Every rank of the EP group allocates one symmetric buffer (``torch.distributed.
_symmetric_memory``, NVSHMEM or CUDA backend) and reaches its peers' buffers through
device pointers over NVLink. A dispatch is one pass of data per direction:

  dispatch (pull): each rank copies its tokens, routing ids and probs into its own
      symmetric buffer; barrier; each rank reads every peer's routing ids (a few KB),
      computes on the GPU where each of its slots lands in its expert-grouped output,
      then one Triton kernel reads each (token, destination rank) row once from the
      owner's buffer over NVLink and writes it straight to every expert-grouped slot it
      has here (probs alongside). No barrier after it: pulls stage into two
      alternating buffer sets, so the next pull cannot overwrite what peers still read.
  combine (push): one Triton kernel sums each token's local expert rows (the per-rank
      partial reduction, float32) and writes the partial straight into the token
      owner's buffer over NVLink; barrier; the owner sums its <= R partials per token.

Bytes over NVLink equal DeepEP's: one row per (token, destination rank) each way.
Backward of dispatch is a combine (plus the prob gradients riding back with it);
backward of combine is a dispatch of the output gradients.

Two modes:
  * default: one host sync per dispatch (the row counts, to size the output), which also
    carries input validation, so every rank raises together on bad input. From the second
    call of a shape the host stays off the GPU's critical path: the kernels before and
    after the sync replay as CUDA graphs (``host_graph``), and the pull starts before the
    sync, into a buffer sized by the most rows seen for that shape (``speculative_rows``;
    the output is the head of that buffer; a call that needs more rows re-plans exactly).
  * static budget, ``MoETokenDispatcher(..., max_rows_per_rank=B)`` (the budget mode of
    ``protocol.DispatchResult``): no host sync after this backend's first call (which
    agrees the hidden size once and sizes the symmetric buffer); ``tokens`` has B rows
    (real rows first, grouped by expert as in the default mode, unused rows zero, prob 0),
    ``tokens_per_expert`` is a device tensor and ``status`` a device int32 of
    ``protocol.STATUS_*`` bits; rows over budget are dropped, never written out of bounds.
    Bad input raises nothing there: the bad rank takes part with no tokens (host error,
    or a hidden size / top-k that no longer fits) or with its bad ids masked (value
    error), its code rides in the meta row every rank reads anyway, so every rank sets
    STATUS_BAD_INPUT, and the result's ``check`` lets ``check_status`` raise later
    on every rank. Dispatch and combine can then be captured in a CUDA graph.

backend_options (all optional):
  max_tokens_per_rank: tokens a rank may send per call; sizes the symmetric buffer up
                       front (default: the largest T seen so far; grown on demand in the
                       default mode, fixed in static mode where extra tokens are dropped
                       and flagged).
  (``max_rows_per_rank`` is the dispatcher's argument, not an option: the backend hands
  it to ``_Engine`` in the engine's own options dict, as the simulated-rank tests do.)
  impl:                "triton" (fused kernels, default) or "torch" (plain torch ops on
                       peer tensors: the simple reference version, default mode only).
  barrier:             "auto" (default: Triton), "triton" or "torch" (the symmetric-memory
                       handle's own barrier; CUDA backend only).
  symm_backend:        None (torch's default), "CUDA" or "NVSHMEM": passed to
                       ``symm_mem.set_backend`` before the first allocation.
  host_graph:          True (default): in the default mode on GPUs, the work before the
                       host sync (staging, barrier, layout, token maps) and the pull after
                       it are captured as CUDA graphs the second time a shape is seen and
                       replayed after, so the host launches two graphs instead of six
                       kernels. False: always eager.
  speculative_rows:    True (default): in the default mode, once a shape has been seen, the
                       pull is queued before the host sync, into a buffer of the most rows
                       seen for that shape (+3 %, 256-row steps); ``tokens``/``probs`` are
                       its head. More rows than that: an exact plan and a second pull.
                       False: exact allocations, the pull waits for the host sync.

The symmetric-memory plumbing (transports, buffer arena) is in ``symm_memory.py`` beside
this file, the CUDA graphs of the default mode in ``graph.py``.

NVLink multicast is never used (TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set unless the caller set them). All dispatch/combine calls of
one EP group must run on one CUDA stream, in the same order on every rank.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ...permute import budget_positions, filled_rows
from ...protocol import (STATUS_BAD_INPUT, STATUS_BARRIER_TIMEOUT, STATUS_ROWS_DROPPED,
                         STATUS_TOKENS_DROPPED, BackendConfig, BudgetCheck,
                         DispatchInputError, DispatchResult, PendingCheck, check_wire_dtype)
from .graph import PreSyncGraph
from .symm_memory import (CH_PRE_PUSH, CH_PULLED, CH_PUSHED, CH_STAGED, Arena,
                           LocalTransport, SymmTransport, Transport, round_up)

_T_ROUND = 64  # token capacity granularity of the symmetric buffer

# Status bits of a static-budget dispatch (``NVSHMEMHandle.status``): ``protocol.STATUS_*``;
# STATUS_TOKENS_DROPPED here means some rank sent more tokens than max_tokens_per_rank.


# =============================================================================== handle


@dataclass(frozen=True)
class NVSHMEMHandle:
    """What combine (and the backward passes) need from one dispatch.

    arena:             the symmetric buffers this dispatch used.
    pos_VK:            [R * T_cap, K] int64: for row t of rank s (v = s * T_cap + t) and
                       slot k, the row of this rank's output it went to; -1 if the slot is
                       not for this rank, -2 if it was dropped (over budget).
    pos_TR:            [T, R] int64: the comb-area row holding rank r's partial sum of
                       token t (r * T_cap + t), -1 when t has no expert on rank r.
    valid_TK:          [T, K] bool: slots whose prob gradient comes back.
    filled_M:          [M] uint8 (1 = real row) or None when every output row is real.
    num_tokens:        T.
    rows_per_rank:     T_cap of the arena.
    num_rows:          M, rows of ``tokens``.
    dtype, hidden:     dtype and H of the dispatched rows.
    tokens_per_expert: [L] int64 (host tensor, or device tensor in static-budget mode).
    status:            static-budget mode: [1] int32 device tensor of STATUS_* bits (0 = all
                       rows delivered); None in the default mode (which raises instead).
    """

    arena: Any
    pos_VK: torch.Tensor
    pos_TR: torch.Tensor
    valid_TK: torch.Tensor
    filled_M: Optional[torch.Tensor]
    num_tokens: int
    rows_per_rank: int
    num_rows: int
    dtype: torch.dtype
    hidden: int
    tokens_per_expert: torch.Tensor
    status: Optional[torch.Tensor]


# =============================================================================== device plan


def static_status(metas_R: torch.Tensor, dropped: torch.Tensor, own: torch.Tensor,
                  token_cap: int) -> torch.Tensor:
    """[1] int32 status of a static-budget dispatch: the reference of the one the fused
    layout writes (``kernels._triton.layout_plan``'s ``status_out``; tests compare): rows dropped here, some rank had more than ``token_cap`` tokens (meta field
    0), some rank had bad input (field 1), OR ``own`` ([1] int32, this rank's status word)."""
    status = dropped.to(torch.int32) * STATUS_ROWS_DROPPED
    status = status + (metas_R[:, 0] > token_cap).any().to(torch.int32) * STATUS_TOKENS_DROPPED
    status = status + (metas_R[:, 1] != 0).any().to(torch.int32) * STATUS_BAD_INPUT
    return (status | own[0]).reshape(1)


def device_plan(lid_VK: torch.Tensor, num_local_experts: int, pad_multiple: Optional[int],
                budget: int):
    """``moe_dispatch.permute.budget_plan`` as (pos_VK, tokens_per_expert_L, dropped): the
    expert-grouped output row of every slot, on the device, without a host sync (rows at or
    beyond ``budget`` dropped, pos -2)."""
    return budget_positions(lid_VK, num_local_experts, budget, pad_multiple)


# =============================================================================== autograd


class _DispatchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, probs_TK, idx_TK, check, eng, box):
        h, tokens, probs_M = eng._dispatch_fwd(x_TH.detach(), probs_TK.detach(), idx_TK, check)
        box["handle"] = h
        ctx.eng, ctx.h = eng, h
        ctx.probs_dtype = probs_TK.dtype
        return tokens, probs_M

    @staticmethod
    def backward(ctx, g_tokens, g_probs):
        g_x, g_p = ctx.eng._push(g_tokens, ctx.h, grad_probs_M=g_probs.float().contiguous())
        return g_x, g_p.to(ctx.probs_dtype), None, None, None, None


class _CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MH, eng, h):
        ctx.eng, ctx.h = eng, h
        out, _ = eng._push(y_MH.detach(), h)
        return out

    @staticmethod
    def backward(ctx, g_out):
        return ctx.eng._pull_rows(g_out, ctx.h), None, None


# =============================================================================== engine


class _Engine:
    """The algorithm, on any transport (symmetric memory, a single GPU, or test ranks)."""

    def __init__(self, tr: Transport, num_experts: int, pad_multiple: Optional[int],
                 options: Optional[dict]):
        opts = dict(options or {})
        known = {"max_rows_per_rank", "max_tokens_per_rank", "impl", "barrier", "symm_backend",
                 "host_graph", "speculative_rows"}
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"nvshmem: unknown backend_options {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        self.tr = tr
        self.R, self.rank = tr.world, tr.rank
        self.E = num_experts
        self.L = num_experts // self.R
        self.pad = pad_multiple
        self.budget = opts.get("max_rows_per_rank")
        self.max_tokens = opts.get("max_tokens_per_rank")
        self.impl = opts.get("impl", "triton")
        if self.impl not in ("triton", "torch"):
            raise ValueError(f"nvshmem: backend_options['impl'] must be 'triton' or 'torch', "
                             f"got {self.impl!r}")
        if self.budget is not None:
            if int(self.budget) < 0:
                raise ValueError("nvshmem: max_rows_per_rank must be >= 0")
            self.budget = int(self.budget)
            if self.impl == "torch":
                raise ValueError("nvshmem: the static-budget mode (max_rows_per_rank) needs "
                                 "impl='triton'")
        if self.impl == "triton":
            from ...kernels import triton_available
            err = triton_available()
            if err:
                raise RuntimeError(f"nvshmem backend: {err}")
        # Default mode on CUDA: the work before the host sync replays as a CUDA graph.
        self.host_graph = bool(opts.get("host_graph", True)) and self.impl == "triton" \
            and self.budget is None and tr.device.type == "cuda"
        self._graphs: Dict[tuple, Any] = {}
        # Static-budget mode: (H, dtype) agreed at this engine's first call.
        self._static_shape: Optional[Tuple[int, torch.dtype]] = None
        self.speculate = bool(opts.get("speculative_rows", True)) and self.budget is None
        self._spec_rows: Dict[tuple, int] = {}
        self._pinned: Dict[int, Any] = {}
        # Set to a list to record (phase, CUDA event, host seconds) per phase boundary
        # (benchmark breakdowns: GPU time between events, host time between marks).
        self.profile: Optional[list] = None
        # Tests: called right before this rank's pull (to make its reads late).
        self.before_pull = None

    def _mark(self, name: str) -> None:
        if self.profile is not None and self.tr.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.profile.append((name, ev, time.perf_counter()))

    # ------------------------------------------------------------------ public

    def dispatch(self, x_TH, idx_TK, probs_TK, check: PendingCheck) -> DispatchResult:
        budget_check = None
        if self.budget is not None:
            x_TH, idx_TK, probs_TK, check, budget_check = self._fit_static(
                x_TH, idx_TK, probs_TK, check)
        box: dict = {}
        tokens, probs_M = _DispatchFn.apply(x_TH, probs_TK, idx_TK, check, self, box)
        h = box["handle"]
        return DispatchResult(tokens, h.tokens_per_expert, probs_M, h, h.status,
                              check=budget_check)

    # ------------------------------------------------------------------ static budget

    def _fit_static(self, x_TH, idx_TK, probs_TK, check: PendingCheck):
        """This rank's input as the static-budget mode sends it, and its ``BudgetCheck``.

        The first call agrees the hidden size (``_agree_static``). Later, a rank whose input
        cannot be sent in the agreed shape (a host error, another hidden size, rows or a
        top-k wider than the symmetric buffer holds) sends no tokens, with code 2 in its meta
        row, which every rank reads anyway: each sets STATUS_BAD_INPUT and nothing raises
        here (a raising rank would leave its peers waiting at the next barrier). Returns
        (x_TH, idx_TK, probs_TK, check, budget_check).
        """
        if self._static_shape is None:
            self._static_shape = self._agree_static(x_TH, check)
        H, dtype = self._static_shape
        message = check.host_error or self._misfit(x_TH, idx_TK, H)
        if message is None:
            own = check.value_help if check.device_bad is not None else None
            return x_TH, idx_TK, probs_TK, check, BudgetCheck(own, check.device_bad)
        dev = self.tr.device
        # The placeholder requires grad while grad mode is on, so this rank runs the
        # backward's collectives (a push and a pull) like its peers do.
        x0 = torch.zeros(0, H, dtype=dtype, device=dev).requires_grad_(torch.is_grad_enabled())
        idx0 = torch.zeros(0, 1, dtype=torch.long, device=dev)
        p0 = torch.zeros(0, 1, dtype=torch.float32, device=dev)
        return x0, idx0, p0, PendingCheck(message, None), BudgetCheck(message)

    def _agree_static(self, x_TH, check: PendingCheck) -> Tuple[int, torch.dtype]:
        """The static-budget mode's one host exchange, at this engine's first call: raises
        on every rank when some rank's input is bad or the hidden sizes differ (as the default
        mode would); returns (H, dtype) that later calls must fit."""
        H = x_TH.shape[1]
        code = int(check.code(self.tr.device).item())
        top = self.tr.host_max([code, H, -H])  # max code, max H, -min H over the ranks
        if code:
            check.raise_if_failed([code], 0)
        if top[0]:
            raise DispatchInputError(
                "dispatch input invalid on another EP rank (the static-budget mode's first "
                "call agrees shapes and raises on every rank)")
        if top[1] != -top[2]:
            raise DispatchInputError(f"dispatch: hidden size differs across EP ranks (from "
                                     f"{-top[2]} to {top[1]})")
        return H, x_TH.dtype

    def _misfit(self, x_TH, idx_TK, H: int) -> Optional[str]:
        """Why this input cannot be sent in the static-budget mode's fixed shapes, or None."""
        arena = self.tr.arena
        K, row_bytes = idx_TK.shape[1], x_TH.shape[1] * x_TH.element_size()
        if x_TH.shape[1] == H and (arena is None or (row_bytes <= arena.row_bytes
                                                     and K <= arena.K_cap)):
            return None
        held = "" if arena is None else \
            f"; the symmetric buffer holds {arena.row_bytes}-byte rows and top-k {arena.K_cap}"
        return (f"nvshmem static-budget mode: this call (hidden {x_TH.shape[1]}, {x_TH.dtype}, "
                f"top-k {K}) does not fit the shapes fixed at the first call (hidden {H}"
                f"{held}): shapes are static in this mode; dispatch the widest layer first")

    def combine(self, y_NH: torch.Tensor, h: NVSHMEMHandle) -> torch.Tensor:
        if y_NH.dim() != 2 or y_NH.shape[0] != h.num_rows or y_NH.shape[1] != h.hidden:
            raise ValueError(f"combine: expert output must be [{h.num_rows}, {h.hidden}] "
                             f"(the dispatched rows), got {tuple(y_NH.shape)}")
        if y_NH.element_size() * h.hidden > h.arena.row_bytes:
            # The receive area holds rows of the dispatch dtype's width.
            y_NH = y_NH.to(h.dtype)
        return _CombineFn.apply(y_NH, self, h)

    # ------------------------------------------------------------------ buffers

    def _arena_for(self, T: int, row_bytes: int, K: int) -> Arena:
        tr = self.tr
        if tr.arena is None:
            want = [max(T, int(self.max_tokens or 0), 1), row_bytes, K]
            want = tr.host_max(want) if tr.world > 1 else want
            self._grow(*want)
        return tr.arena

    def _grow(self, T: int, row_bytes: int, K: int) -> Arena:
        tr = self.tr
        old = tr.arena
        if old is not None:  # grow geometrically: few generations, each kept alive
            T = max(T, old.T_cap, (old.T_cap * 3) // 2 if T > old.T_cap else 0)
            row_bytes = max(row_bytes, old.row_bytes)
            K = max(K, old.K_cap)
        tr.arena = Arena(tr, round_up(T, _T_ROUND), round_up(row_bytes, 16), K)
        tr.arenas.append(tr.arena)
        return tr.arena

    # ------------------------------------------------------------------ dispatch

    def _dispatch_fwd(self, x_TH, probs_TK, idx_TK, check):
        tr, R, L = self.tr, self.R, self.L
        dev = x_TH.device
        T, K = idx_TK.shape
        H = x_TH.shape[1]
        dtype = x_TH.dtype
        row_bytes = H * x_TH.element_size()
        static = self.budget is not None
        bad_host = check.host_error is not None
        self._mark("dispatch")
        tr._last_pull = None  # unknown until this op completes (it may raise midway)
        code = check.code(dev)  # a cached zero when nothing was checked: no launch
        arena = self._arena_for(T, row_bytes, K)
        while True:
            # (In static mode ``_fit_static`` already turned a misfit into a host error.)
            fits_hk = row_bytes <= arena.row_bytes and K <= arena.K_cap
            fits = fits_hk and (T <= arena.T_cap or static)
            T_st = min(T, arena.T_cap) if fits else 0
            arena.next_stage()
            # Every rank stages rows K_cap wide (-1 past its own K), so ranks whose K differ
            # (e.g. a zero-token rank routed from a dense map) share one slot layout.
            Kc = arena.K_cap
            # Default mode: once a shape has been seen, pull before the host knows the exact
            # row count, into a buffer of the largest count seen so far (plus slack); the
            # host sync then overlaps the pull instead of preceding it.
            spec = self._spec_rows.get((T, K, H, dtype)) \
                if self.speculate and not static and fits and not bad_host else None
            plan_budget = self.budget if static else (spec if spec is not None else 1 << 62)
            graph = self._graph_for(arena, x_TH, idx_TK, probs_TK, code, T_st, T, row_bytes,
                                    plan_budget) \
                if self.host_graph and fits and not bad_host else None
            pos_TR = valid_TK = pulled = fused = None
            if graph is not None:
                # Same device work as below (and the token maps), in one graph replay.
                pos_VK, host_buf, pos_TR, valid_TK = graph.before(x_TH, idx_TK, probs_TK, code)
                self._mark("graph_before")
            else:
                self._stage(arena, x_TH, idx_TK, probs_TK, T_st, K, H, dtype,
                            bad_host or not fits, code, T, row_bytes, fits)
                self._mark("stage")
                tr.barrier(CH_STAGED)
                self._mark("barrier")
                # The plan is queued before the host sync, so the GPU computes it while the
                # host waits.
                metas_R, pos_VK, tpe_L, dropped, host_buf, fused = self._layout_plan(
                    arena, Kc, plan_budget)
                self._mark("layout_plan")
                if static:
                    break
            if spec is not None:
                fetch = self._host_fetch(host_buf)
                tok_S, probs_S, pos_VK = self._pull_new(arena, graph, pos_VK, spec, H, dtype)
                pulled = (tok_S, probs_S)
                host = fetch()  # the one sync, while the pull runs
            else:
                host = host_buf.tolist()  # the one sync: metas, counts, status in one copy
            self._mark("host_sync")
            rows = [host[16 * r:16 * r + 5] for r in range(R)]
            counts = host[16 * R:16 * R + L]  # padded rows per local expert
            if host[-1] & STATUS_BARRIER_TIMEOUT:
                raise RuntimeError(
                    "nvshmem: a device barrier timed out waiting for a peer rank (a rank died, "
                    "or ranks called dispatch/combine in different orders); results since are "
                    "invalid")
            check.raise_if_failed([row[1] for row in rows], self.rank)
            ok = [row for row in rows if row[1] == 0]
            vals = [row[2] for row in ok]
            if any(v != vals[0] for v in vals):
                raise DispatchInputError(f"dispatch: hidden size (bytes per row) differs across "
                                         f"EP ranks: {vals}")
            if all(row[4] for row in rows):
                break
            # Some rank's tokens did not fit: every rank saw the same metas, so all grow
            # together (a collective allocation) and stage again.
            arena = self._grow(max(row[0] for row in rows), max(row[2] for row in rows),
                               max(row[3] for row in rows))
        T_cap = arena.T_cap
        if pulled is not None and host[16 * R + L]:
            # More rows than the speculative buffer: the rows past it were not written. Plan
            # again without a limit (peers keep this staging set until our next pull-type
            # op) and pull into an exact buffer.
            pulled = graph = None
            _, pos_VK, _, _, host_buf, _ = self._layout_plan(arena, Kc, 1 << 62)
            counts = host_buf.tolist()[16 * R:16 * R + L]
        budget = self.budget if static else sum(counts)
        if not static and self.speculate:
            # High-water mark, 3 % slack, in 256-row steps: few distinct sizes (and graphs).
            key = (T, K, H, dtype)
            self._spec_rows[key] = max(self._spec_rows.get(key, 0),
                                       round_up(budget + budget // 32 + 1, 256))
        # In the default mode the budget is exact, so only padding rows need zeroing.
        filled_M = status = None
        if static:  # written by the layout launches
            filled_M, status = fused
        elif static or (self.pad and self.pad > 1):
            filled_M = filled_rows(pos_VK, budget)
        T_eff = min(T, T_cap)
        if pulled is not None:
            tokens, probs_M = pulled[0][:budget], pulled[1][:budget]
        else:
            tokens, probs_M, pos_VK = self._pull_new(arena, graph, pos_VK, budget, H, dtype)
        if filled_M is not None:  # rows no slot wrote (padding, unused budget): zeros, prob 0
            self._zero_unfilled(tokens, filled_M, probs_M)
        self._end_pull()
        self._mark("barrier_end")

        if pos_TR is None:
            # Where each token's partial sums come back, and which prob grads are real.
            pos_TR, valid_TK = self._token_maps(idx_TK, T_eff, T_cap)
        if static:  # (static mode runs the Triton layout, which wrote filled_M and status)
            tpe = tpe_L
        else:
            tpe = torch.tensor(counts, dtype=torch.long)
        h = NVSHMEMHandle(arena, pos_VK, pos_TR, valid_TK, filled_M, T, T_cap, budget, dtype, H,
                          tpe, status)
        return h, tokens, probs_M

    def _pull_new(self, arena, graph, pos_VK, rows: int, H: int, dtype):
        """Pull into new [rows, H] tokens and [rows] float32 probs (rows no slot writes are
        left as allocated). Returns (tokens, probs_M, pos_VK): with a graph, pos_VK is its
        copy of the plan (the graph's own is rewritten by its next replay)."""
        dev = self.tr.device
        tokens = torch.empty(rows, H, dtype=dtype, device=dev)
        probs_M = torch.empty(rows, dtype=torch.float32, device=dev)
        if self.before_pull is not None:
            self.before_pull()
        if graph is not None:
            pos_VK = graph.pull(tokens, probs_M)
        else:
            self._pull(arena, pos_VK, tokens, probs_M, with_probs=True)
        self._mark("pull")
        return tokens, probs_M, pos_VK

    def _token_maps(self, idx_TK, T_eff, T_cap):
        """(pos_TR, valid_TK) of ``NVSHMEMHandle`` (one launch on the Triton path)."""
        R, L, E = self.R, self.L, self.E
        T = idx_TK.shape[0]
        dev = idx_TK.device
        if self.impl == "triton":
            from ...kernels import _triton
            valid_TK = torch.empty(idx_TK.shape, dtype=torch.bool, device=dev)
            pos_TR = torch.empty(T, R, dtype=torch.int64, device=dev)
            _triton.token_maps(idx_TK.contiguous(), T_eff, E, L, T_cap, R, valid_TK, pos_TR)
            return pos_TR, valid_TK
        valid_TK = (idx_TK >= 0) & (idx_TK < E)
        if T_eff < T:
            valid_TK = valid_TK & (torch.arange(T, device=dev) < T_eff).unsqueeze(1)
        rank_TK = torch.where(valid_TK, torch.div(idx_TK, L, rounding_mode="floor"), R)
        has_TR = torch.zeros(T, R + 1, dtype=torch.bool, device=dev)
        has_TR.scatter_(1, rank_TK, True)
        has_TR = has_TR[:, :R]
        rows_TR = torch.arange(R, device=dev).unsqueeze(0) * T_cap + \
            torch.arange(T, device=dev).unsqueeze(1)
        return torch.where(has_TR, rows_TR, -1), valid_TK

    def _host_fetch(self, host_buf: torch.Tensor):
        """Start copying ``host_buf`` to the host; returns a function that waits for the
        copy (not for later work on the stream) and gives the list of its values."""
        if host_buf.device.type != "cuda":
            return host_buf.tolist
        pin = self._pinned.get(host_buf.numel())
        if pin is None:
            pin = self._pinned[host_buf.numel()] = (
                torch.empty(host_buf.numel(), dtype=host_buf.dtype, pin_memory=True),
                torch.cuda.Event())
        buf, ev = pin
        # The previous copy into ``buf`` was waited for by the previous dispatch.
        buf.copy_(host_buf, non_blocking=True)
        ev.record()

        def fetch():
            ev.synchronize()
            return buf.tolist()
        return fetch

    def _graph_for(self, arena, x_TH, idx_TK, probs_TK, code, T_st, T, row_bytes,
                   plan_budget):
        """The pre-sync graph for this call's shapes, or None (run eagerly).

        A shape is run eagerly the first time it is seen (that compiles its kernels), and
        captured the second time. Inputs the kernel cannot reach through the graph's address
        table (x not 16-byte aligned, non-contiguous) run eagerly."""
        if self.tr.capturing() or x_TH.data_ptr() % 16 or not (
                x_TH.is_contiguous() and idx_TK.is_contiguous() and probs_TK.is_contiguous()):
            return None
        key = (id(arena), arena.cur, T, T_st, tuple(idx_TK.shape), x_TH.shape[1], x_TH.dtype,
               idx_TK.dtype, probs_TK.dtype, code.dtype, row_bytes, plan_budget)
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= 16:  # shapes keep changing: start over, bounded memory
                if x_TH.device.type == "cuda":
                    # No graph being dropped may still be running (a rare, one-off wait).
                    torch.cuda.current_stream(x_TH.device).synchronize()
                self._graphs.clear()
            self._graphs[key] = False
            return None
        if g is False:
            g = self._graphs[key] = PreSyncGraph(self, arena, x_TH, idx_TK, probs_TK, code,
                                                  T_st, T, row_bytes, plan_budget)
        return g

    def _stage(self, arena, x_TH, idx_TK, probs_TK, T_st, K, H, dtype, bad, code, T,
               row_bytes, fits):
        idx_st = arena.local("idx", torch.int32, (arena.T_cap * arena.K_cap,))
        meta = arena.local("meta", torch.int64, (16,))
        if not bad and self.impl == "triton":
            # One launch for rows, ids, probs and the meta row (instead of ~10 small ops).
            from ...kernels import _triton
            _triton.stage(x_TH.contiguous(), idx_TK.contiguous(), probs_TK.contiguous(), T_st,
                          arena.local("x", dtype, (arena.T_cap, H)),
                          idx_st.view(arena.T_cap, arena.K_cap),
                          arena.local("probs", torch.float32, (arena.T_cap, arena.K_cap)),
                          meta, code, T, row_bytes)
            return
        if bad:
            idx_st.fill_(-1)  # contributes no rows, whatever K peers read with
        else:
            arena.local("x", dtype, (arena.T_cap, H))[:T_st].copy_(x_TH[:T_st])
            idx_st.fill_(-1)
            idx_st.view(arena.T_cap, arena.K_cap)[:T_st, :K].copy_(idx_TK[:T_st])
            probs_v = arena.local("probs", torch.float32, (arena.T_cap, arena.K_cap))
            probs_v.zero_()
            probs_v[:T_st, :K].copy_(probs_TK[:T_st])
        meta[0].fill_(T)
        meta[1].copy_(code)
        meta[2].fill_(row_bytes)
        meta[3].fill_(K)
        meta[4].fill_(1 if fits else 0)

    def _layout_plan(self, arena, K, budget):
        """(metas_R [R, 16], pos_VK, tokens_per_expert_L, dropped, host_buf, fused): every
        rank's meta row, the plan of ``device_plan``, one int64 buffer [R*16 + L + 2] holding
        metas, tokens_per_expert, dropped and this rank's status (the host sync's payload),
        and in static mode on the Triton path (filled_M [budget] uint8, status [1] int32)
        written by the same launches (else None: the caller derives them). The Triton path
        is two launches; the torch path is the reference."""
        R, L, T_cap, dev = self.R, self.L, arena.T_cap, self.tr.device
        if self.impl == "triton":
            from ...kernels import _triton
            # Default mode reads host_buf back at once, so one buffer per arena serves
            # every call; static mode hands slices of it to the caller: a fresh one.
            static = self.budget is not None
            host_buf = torch.empty(R * 16 + L + 2, dtype=torch.int64, device=dev) if static \
                else arena.scratch("host", R * 16 + L + 2, torch.int64)
            pos = torch.empty(R * T_cap * K, dtype=torch.int64, device=dev)
            fused = (torch.empty(budget, dtype=torch.uint8, device=dev),
                     torch.empty(1, dtype=torch.int32, device=dev)) if static else (None, None)
            _triton.layout_plan(arena.table("idx"), arena.table("meta"), self.tr.status,
                                T_cap * K, self.rank * L, L, self.pad or 1, budget, pos,
                                host_buf,
                                scratch=lambda n: arena.scratch("hist", n, torch.int32),
                                filled_out=fused[0], status_out=fused[1], token_cap=T_cap)
            return (host_buf[:R * 16].view(R, 16), pos.view(R * T_cap, K),
                    host_buf[R * 16:R * 16 + L], host_buf[R * 16 + L], host_buf,
                    fused if static else None)
        metas_R, lid_VK = self._layout(arena, K)
        pos_VK, tpe_L, dropped = device_plan(lid_VK, L, self.pad, budget)
        host_buf = torch.cat([metas_R.reshape(-1), tpe_L, dropped.to(torch.int64).view(1),
                              self.tr.status.to(torch.int64)])
        return metas_R, pos_VK, tpe_L, dropped, host_buf, None

    def _layout(self, arena, K):
        """Every rank's meta row and this rank's local expert id of every peer slot."""
        R, T_cap, dev = self.R, arena.T_cap, self.tr.device
        metas = torch.empty(R, 16, dtype=torch.int64, device=dev)
        idx_all = torch.empty(R, T_cap * K, dtype=torch.int32, device=dev)
        if self.impl == "triton":
            from ...kernels import _triton
            _triton.peer_gather(arena.table("meta"), metas)
            _triton.peer_gather(arena.table("idx"), idx_all)
        else:
            for s in range(R):
                metas[s].copy_(arena.peer(s, "meta", torch.int64, (16,)))
                idx_all[s].copy_(arena.peer(s, "idx", torch.int32, (T_cap * K,)))
        ids = idx_all.view(R * T_cap, K).long()
        e0 = self.rank * self.L
        mine = (ids >= e0) & (ids < e0 + self.L)
        return metas, torch.where(mine, ids - e0, -1)

    # ------------------------------------------------------------------ data movement

    def _pull(self, arena, pos_VK, out_MH, probs_M, with_probs: bool):
        """out[pos[s*T_cap+t, k]] = rank s's staged row t (and its probs)."""
        R, T_cap = self.R, arena.T_cap
        H, dtype = out_MH.shape[1], out_MH.dtype
        if self.impl == "triton":
            from ...kernels import _triton
            _triton.peer_scatter_rows(arena.table("x"), T_cap, self.rank, pos_VK, out_MH,
                                      arena.table("probs") if with_probs else None,
                                      probs_M if with_probs else None)
            return
        K = pos_VK.shape[1]
        for s in range(R):
            pos_s = pos_VK[s * T_cap:(s + 1) * T_cap]
            x_s = arena.peer(s, "x", dtype, (T_cap, H))
            p_s = arena.peer(s, "probs", torch.float32, (T_cap, K)) if with_probs else None
            for k in range(K):
                t_sel = torch.nonzero(pos_s[:, k] >= 0).flatten()
                dst = pos_s[t_sel, k]
                out_MH.index_copy_(0, dst, x_s.index_select(0, t_sel))
                if with_probs:
                    probs_M.index_copy_(0, dst, p_s[:, k].index_select(0, t_sel))

    def _zero_unfilled(self, out_MH, filled_M, probs_M=None):
        if self.impl == "triton":
            from ...kernels import _triton
            _triton.zero_unfilled(out_MH, filled_M, probs_M)
        else:
            empty = filled_M == 0
            out_MH.masked_fill_(empty.unsqueeze(1), 0)
            if probs_M is not None:
                probs_M.masked_fill_(empty, 0)

    def _push(self, y_MH, h: NVSHMEMHandle, grad_probs_M: Optional[torch.Tensor] = None):
        """Per-rank partial sums into their owners' receive areas, then the owner's sum.
        Returns (out_TH, grad_probs_TK or None)."""
        tr, R, arena = self.tr, self.R, h.arena
        T_cap, H = h.rows_per_rank, h.hidden
        y_MH = y_MH.contiguous()
        dtype = y_MH.dtype
        K = h.pos_VK.shape[1]
        self._mark("combine")
        if tr.need_pre_push_barrier():
            tr.barrier(CH_PRE_PUSH)
        comb = arena.local("comb", dtype, (R * T_cap, H))
        if self.impl == "triton":
            from ...kernels import _triton
            _triton.peer_gather_reduce(y_MH, h.pos_VK, arena.table("comb"), T_cap, self.rank,
                                       comb, grad_probs_M,
                                       arena.table("gprob") if grad_probs_M is not None else None)
        else:
            self._push_torch(y_MH, h, grad_probs_M, arena, T_cap, H, K)
        self._mark("push")
        tr.barrier(CH_PUSHED)
        tr.note_op(False)
        self._mark("barrier")
        out = torch.empty(h.num_tokens, H, dtype=dtype, device=y_MH.device)
        if self.impl == "triton":
            from ...kernels import reduce_rows
            reduce_rows(comb, h.pos_TR, out)
        else:
            # Rows nobody wrote hold garbage: select, never multiply by a 0 mask.
            parts = comb.index_select(0, h.pos_TR.clamp(min=0).reshape(-1)).view(-1, R, H)
            parts = torch.where((h.pos_TR >= 0).unsqueeze(2), parts.float(), 0.0)
            out.copy_(parts.sum(1))
        self._mark("reduce")
        g_p = None
        if grad_probs_M is not None:
            T = h.num_tokens
            # The gradient area is K_cap wide; this rank's own slots are the first K.
            g = arena.local("gprob", torch.float32, (T_cap, K))[:min(T, T_cap),
                                                                 :h.valid_TK.shape[1]]
            g_p = torch.zeros(h.valid_TK.shape, dtype=torch.float32, device=y_MH.device)
            g_p[:g.shape[0]] = g
            g_p = torch.where(h.valid_TK, g_p, 0.0)
        return out, g_p

    def _push_torch(self, y_MH, h, grad_probs_M, arena, T_cap, H, K):
        for s in range(self.R):
            pos_s = h.pos_VK[s * T_cap:(s + 1) * T_cap]
            part = torch.zeros(T_cap, H, dtype=torch.float32, device=y_MH.device)
            for k in range(K):
                t_sel = torch.nonzero(pos_s[:, k] >= 0).flatten()
                part.index_add_(0, t_sel, y_MH.index_select(0, pos_s[t_sel, k]).float())
            sent = torch.nonzero((pos_s != -1).any(1)).flatten()
            dst = arena.peer(s, "comb", y_MH.dtype, (self.R * T_cap, H))
            dst.index_copy_(0, sent + self.rank * T_cap, part.index_select(0, sent).to(y_MH.dtype))
            if grad_probs_M is not None:
                gdst = arena.peer(s, "gprob", torch.float32, (T_cap, K))
                pos_flat = pos_s.reshape(-1)
                slots = torch.nonzero(pos_flat != -1).flatten()
                p = pos_flat.index_select(0, slots)
                vals = torch.where(p >= 0, grad_probs_M.index_select(0, p.clamp(min=0)), 0.0) \
                    if grad_probs_M.numel() else torch.zeros_like(p, dtype=torch.float32)
                gdst.view(-1).index_copy_(0, slots, vals)

    def _pull_rows(self, g_out_TH, h: NVSHMEMHandle) -> torch.Tensor:
        """Backward of combine: each dispatched row gets its token's output gradient."""
        tr, arena = self.tr, h.arena
        T_cap, H = h.rows_per_rank, h.hidden
        dtype = g_out_TH.dtype
        if g_out_TH.element_size() * H > arena.row_bytes:
            dtype = h.dtype
        T_st = min(h.num_tokens, T_cap)
        tr._last_pull = None
        arena.next_stage()
        arena.local("x", dtype, (T_cap, H))[:T_st].copy_(g_out_TH[:T_st])
        tr.barrier(CH_STAGED)
        g_y = torch.empty(h.num_rows, H, dtype=dtype, device=g_out_TH.device)
        self._pull(arena, h.pos_VK, g_y, None, with_probs=False)
        if h.filled_M is not None:
            self._zero_unfilled(g_y, h.filled_M)
        self._end_pull()
        return g_y.to(g_out_TH.dtype)

    def _end_pull(self) -> None:
        """After a pull. Eagerly nothing: the next pull-type op stages into the other set
        (see ``Arena``). A captured graph may be replayed back to back, reusing the
        staging set it captured, so there every rank waits for every peer's reads."""
        if self.tr.capturing():
            self.tr.barrier(CH_PULLED)
        self.tr.note_op(True)


# One transport per (group, device): every layer of a model shares its symmetric buffers.
_transports: Dict[Tuple[str, str], Transport] = {}


# =============================================================================== backend


class NVSHMEMBackend:
    """Fused single-pass dispatch/combine over torch symmetric memory (see module doc)."""

    name = "nvshmem"

    def __init__(self, config: BackendConfig):
        check_wire_dtype(config, self)  # no FP8 rows yet: refuse rather than move BF16
        reason = self.availability()
        if reason is not None:
            raise RuntimeError(f"nvshmem backend: {reason}")
        self.cfg = config
        opts = dict(config.options or {})
        if "max_rows_per_rank" in opts:
            raise ValueError("nvshmem: max_rows_per_rank is not a backend option; pass "
                             "MoETokenDispatcher(..., max_rows_per_rank=B)")
        if config.max_rows_per_rank is not None:
            opts["max_rows_per_rank"] = config.max_rows_per_rank  # the engine's own key
        dev = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_initialized() or dist.get_world_size(config.group) == 1:
            key = ("local", str(dev))
            tr = _transports.get(key)
            if tr is None:
                tr = _transports[key] = LocalTransport(dev)
        else:
            key = (config.group.group_name, str(dev))
            tr = _transports.get(key)
            if tr is None:
                tr = _transports[key] = SymmTransport(
                    config.group, dev, opts.get("barrier", "auto"), opts.get("symm_backend"))
        self.engine = _Engine(tr, config.num_experts, config.pad_multiple, opts)

    @classmethod
    def availability(cls) -> Optional[str]:
        if not torch.cuda.is_available():
            return "needs CUDA GPUs (torch.cuda.is_available() is False)"
        if not dist.is_available():
            return "this torch build has no torch.distributed"
        try:
            importlib.import_module("torch.distributed._symmetric_memory")
        except Exception as exc:
            return (f"this torch has no usable torch.distributed._symmetric_memory "
                    f"({type(exc).__name__}: {exc}); needs torch >= 2.9 built with CUDA")
        from ...kernels import triton_available
        return triton_available()

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: PendingCheck) -> DispatchResult:
        if x_TH.device.type != "cuda":
            raise ValueError(f"nvshmem backend needs CUDA tensors, got hidden on {x_TH.device}")
        return self.engine.dispatch(x_TH, idx_TK, probs_TK, check)

    def combine(self, y_NH: torch.Tensor, handle: NVSHMEMHandle) -> torch.Tensor:
        if y_NH.device.type != "cuda":
            raise ValueError(f"nvshmem backend needs CUDA tensors, got expert output on "
                             f"{y_NH.device}")
        return self.engine.combine(y_NH, handle)
