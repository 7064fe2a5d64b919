"""The ``nvshmem`` backend's default-mode dispatch as two CUDA graphs around its host sync.

``PreSyncGraph`` captures the kernels before the sync (staging, barrier, layout, token
maps) and the pull after it, once per shape; ``capture`` makes a graph of a body's
launches on a side stream. Off GPUs (simulated ranks in tests) ``RerunBody`` stands in for
a graph: its replay runs the body again. Used by ``engine.py`` beside it only; it takes the engine as a plain argument
(``eng``: the backend's ``_Engine``, read for its transport, R, L, E, rank and padding) and
never imports it, so the two modules form no import circle.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .symm_memory import CH_STAGED, Arena

class PreSyncGraph:
    """A default-mode dispatch as two CUDA graphs, captured once per (arena, staging set,
    shapes, dtypes), around its host sync:
      before: the staging kernel (inputs reached through an address table), the
              after-staging barrier, the two layout kernels and the combine-side token maps
              (which need only this rank's ids);
      after:  the pull (outputs reached through an address table); it also copies the plan
              out for the handle, since the graph's own is rewritten by the next replay.
    A replay costs the host one call (measured on H200: 2.6 us, against 20-50 us per
    Triton launch; ``python -m moe_dispatch.bench.launch``), so the GPU no longer waits for
    the host on either side of the sync; everything sized before the sync is allocated
    before it. The device work is exactly the eager path's, so ranks may mix paths.

    Buffers it owns: ``io`` (the address tables, filled from pinned host memory before each
    replay: the previous replays' copies have run by then, since every dispatch waits for
    its "before" part), ``pos``
    (the plan), ``host_buf`` (metas, counts, status: read back by the sync) and the layout's
    histogram scratch."""

    def __init__(self, eng: Any, arena: Arena, x_TH, idx_TK, probs_TK, code, T_st: int,
                 T: int, row_bytes: int, plan_budget: int):
        from ...kernels import _triton
        tr, R, L = eng.tr, eng.R, eng.L
        dev = tr.device
        T_cap, Kc, H = arena.T_cap, arena.K_cap, x_TH.shape[1]
        self.shape = (R * T_cap, Kc)
        self.eng, self.arena, self.T, self.R, self.dev = eng, arena, T, R, dev
        # Address tables (16-byte aligned slices): [0:4] staging inputs (x, ids, probs,
        # check code), [4:7] token maps (ids, valid_TK, pos_TR), [8:11] pull outputs
        # (tokens, probs, the plan's copy). On the host the pull's entries alternate
        # between [8:11] and [12:15]: a speculative pull's table copy is queued after the
        # point the host waits for, so the next call may still find it pending; the one
        # after has waited past it.
        self.io_host = torch.zeros(16, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.io_np = self.io_host.numpy()
        self.io = torch.zeros(12, dtype=torch.int64, device=dev)
        self._slot = 8
        self.after: Optional[torch.cuda.CUDAGraph] = None
        self.pos = torch.empty(R * T_cap * Kc, dtype=torch.int64, device=dev)
        self.host_buf = torch.empty(R * 16 + L + 2, dtype=torch.int64, device=dev)
        # Every buffer a captured graph touches must live as long as the graph: a graph
        # holds raw addresses, not tensors. (The histogram scratch once lived only in a
        # closure: freed after capture, its block went to small tensors such as pos_TR,
        # which the layout kernel then overwrote.)
        self.hist: List[torch.Tensor] = []
        hist = self.hist
        # Placeholders for the tensors reached through the tables: the kernels take only
        # their dtypes and shapes. Views of one graph-owned element each, so no launch in
        # the graphs names memory the graph does not own.
        self.likes: Dict[torch.dtype, torch.Tensor] = {}
        like = self._like
        inputs = (x_TH, idx_TK, probs_TK, code)
        x_TH, idx_TK, probs_TK, code = (like(t) for t in inputs)

        def scratch(n):
            if not hist:
                hist.append(torch.empty(n, dtype=torch.int32, device=dev))
            return hist[0][:n]

        views = (arena.local("x", x_TH.dtype, (T_cap, H)),
                 arena.local("idx", torch.int32, (T_cap, Kc)),
                 arena.local("probs", torch.float32, (T_cap, Kc)),
                 arena.local("meta", torch.int64, (16,)))
        idx_table, meta_table = arena.table("idx"), arena.table("meta")
        T_eff = min(T, T_cap)
        valid_TK, pos_TR = self._maps(idx_TK)  # this call's outputs of the warm-up
        valid_like, pos_TR_like = like(valid_TK), like(pos_TR)

        def stage():
            _triton.stage(x_TH, idx_TK, probs_TK, T_st, *views, code, T, row_bytes,
                          src_table=self.io[0:4])

        def layout():
            _triton.layout_plan(idx_table, meta_table, tr.status, T_cap * Kc, eng.rank * L, L,
                                eng.pad or 1, plan_budget, self.pos, self.host_buf,
                                scratch=scratch)
            _triton.token_maps(idx_TK, T_eff, eng.E, L, T_cap, R, valid_like, pos_TR_like,
                               io_table=self.io[4:7])

        # Compile the address-table kernels (and size the scratch) outside the capture.
        # Staging twice is harmless (peers read this set only after the barrier); the
        # barrier must run exactly once per op, so it only runs inside the graph.
        self._fill(*inputs, valid_TK, pos_TR)
        stage()
        layout()  # reads peers' stale ids into our own buffers: overwritten by the replay

        def before():
            stage()
            tr.barrier(CH_STAGED)
            layout()
        self.graph = capture(before, dev)

    def _like(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of ``t``'s dtype and shape over one graph-owned element."""
        one = self.likes.get(t.dtype)
        if one is None:
            one = self.likes[t.dtype] = torch.zeros(1, dtype=t.dtype, device=self.dev)
        return one.view([1] * t.dim()).expand(t.shape)

    def _maps(self, idx_TK):
        return (torch.empty(idx_TK.shape, dtype=torch.bool, device=self.dev),
                torch.empty(self.T, self.R, dtype=torch.int64, device=self.dev))

    def _fill(self, x_TH, idx_TK, probs_TK, code, valid_TK, pos_TR) -> None:
        # The previous replays' copies have run: every dispatch syncs after "before".
        self.io_np[0:7] = (x_TH.data_ptr(), idx_TK.data_ptr(), probs_TK.data_ptr(),
                           code.data_ptr(), idx_TK.data_ptr(), valid_TK.data_ptr(),
                           pos_TR.data_ptr())
        self.io[0:7].copy_(self.io_host[0:7], non_blocking=True)

    def before(self, x_TH, idx_TK, probs_TK, code):
        """Stage, barrier, plan and token maps of this call's inputs (queued, no sync);
        returns (pos_VK, host_buf, pos_TR, valid_TK); host_buf is the graph's own."""
        valid_TK, pos_TR = self._maps(idx_TK)
        self._fill(x_TH, idx_TK, probs_TK, code, valid_TK, pos_TR)
        self.graph.replay()
        return self.pos.view(self.shape), self.host_buf, pos_TR, valid_TK

    def pull(self, tokens_MH, probs_M):
        """After the sync: rows and probs into ``tokens_MH`` / ``probs_M``; returns the
        plan's copy for the handle (a new [R * T_cap, K_cap] int64 tensor)."""
        from ...kernels import _triton
        eng, arena = self.eng, self.arena
        pos_out = torch.empty(self.shape, dtype=torch.int64, device=self.dev)
        a = self._slot = 20 - self._slot  # 8, 12, 8, ...
        self.io_np[a:a + 3] = (tokens_MH.data_ptr(), probs_M.data_ptr(), pos_out.data_ptr())
        self.io[8:11].copy_(self.io_host[a:a + 3], non_blocking=True)
        if self.after is not None:
            self.after.replay()
            return pos_out
        pos, table = self.pos.view(self.shape), self.io[8:11]
        out_like, probs_like = self._like(tokens_MH), self._like(probs_M)

        def body():
            _triton.peer_scatter_rows(arena.table("x"), arena.T_cap, eng.rank, pos, out_like,
                                      arena.table("probs"), probs_like, dst_table=table)

        body()  # this call's work (and the kernel's compilation), then capture for the next
        self.after = capture(body, self.dev)
        return pos_out


class RerunBody:
    """Off GPUs (simulated ranks in tests) a "graph" whose replay runs its body again, so
    the graph path's tables, slots and fallbacks run on CPU too."""

    def __init__(self, body):
        self.replay = body


def capture(body, dev) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``body``'s launches (captured on a side stream, not run)."""
    if dev.type != "cuda":
        return RerunBody(body)
    graph = torch.cuda.CUDAGraph()
    cur = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            body()
        finally:
            graph.capture_end()
    cur.wait_stream(side)
    return graph
