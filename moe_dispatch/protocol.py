"""The one protocol every dispatch backend implements.

Shapes: T local tokens, K top-k slots, E global experts, L local experts (E // R),
R ranks in the EP group, H hidden size, N dispatched rows on this rank.

A backend receives routing in the canonical top-k form (``idx_TK`` int64 with -1 for a
masked slot, ``probs_TK`` float32, any value where masked: a backend reads only the probs
of slots that reach an expert row, and gives masked slots zero gradient) and returns rows
grouped by local expert. The probs travel with the rows but are never applied by a backend: experts
apply them. Everything combine needs is returned as an explicit, immutable handle, so a
backend holds no per-call state and two layers (or an activation recompute) can never
read each other's metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class BackendConfig:
    """Construction arguments shared by all backends.

    group:        the expert-parallel process group (already resolved, never None).
    num_experts:  E, global number of experts; E % group size == 0.
    pad_multiple: if set, every local expert's row count is rounded up to a multiple of it
                  with zero rows carrying prob 0 (for FP8 / grouped-GEMM alignment).
    options:      backend-specific knobs (e.g. ``num_sms`` for DeepEP), passed through
                  from ``MoETokenDispatcher(..., backend_options={...})``.
    max_rows_per_rank: B, or None. Set: the sync-free budget mode (see ``DispatchResult``):
                  dispatch returns exactly B rows on every rank, never syncs the host, and
                  reports rows dropped over the budget (and bad input) in a device status.
                  A multiple of ``pad_multiple`` when both are set.
    wire_dtype:   None (rows travel in the input's dtype) or ``torch.float8_e4m3fn``: each
                  token is quantised once to e4m3 with one float32 scale per 1x128 block
                  (``moe_dispatch.kernels.fp8``), FP8 rows + scales cross the wire, and the
                  receiver dequantises in its permute, so ``tokens_NH`` keeps the input's
                  dtype; combine and both backwards stay in the input's dtype (gradients
                  pass the quantiser straight through). Only backends whose
                  ``supported_wire_dtypes`` hold it accept it (``check_wire_dtype``).
    """

    group: Any
    num_experts: int
    pad_multiple: Optional[int] = None
    options: Any = None
    max_rows_per_rank: Optional[int] = None
    wire_dtype: Optional[torch.dtype] = None

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size


@dataclass(frozen=True)
class DispatchResult:
    """What a backend's ``dispatch`` returns.

    tokens_NH:           [N, H], dtype of the input; rows grouped by local expert in ascending
                         expert id, and within an expert in global token order (source rank,
                         then token index). Padding rows (pad_multiple) are zeros at the end
                         of their expert's block.
    tokens_per_expert_L: [L] int64, rows per local expert (padding included). On the host
                         for backends that sync; a device tensor in sync-free modes.
    probs_N:             [N] float32, the routing prob of each row (0 on padding rows);
                         differentiable w.r.t. the router probs.
    handle:              frozen metadata that ``combine`` needs; opaque to callers.
    status:              budget mode: [1] int32 device tensor of ``STATUS_*`` bits (0 = every
                         row delivered, input valid); None in the exact modes (which raise).
    fp8:                 with ``wire_dtype=float8_e4m3fn``: the rows' quantised form, an
                         ``moe_dispatch.backends.wire.Fp8Rows`` (``tokens_fp8`` [N, H] e4m3,
                         ``scales`` [N, H / 128] float32, made on first use); else None.
    check:               budget mode: this rank's ``BudgetCheck`` (what ``raise_on_status``
                         raises when the status says some input was bad); None otherwise.

    Budget mode (``BackendConfig.max_rows_per_rank = B``): N == B on every call. The real
    rows come first, grouped by local expert exactly as in the exact mode (so
    ``cumsum(tokens_per_expert_L)`` are the grouped GEMM's offsets), then unused rows (zero,
    prob 0). Rows past B are dropped and flagged (``STATUS_ROWS_DROPPED``), never written
    out of bounds; combine and both backwards are exact for the rows kept. Bad input makes
    ``STATUS_BAD_INPUT`` set on every rank (its rows are masked, so the step computes
    harmlessly) and is raised by ``raise_on_status`` where the caller reads the status.
    """

    tokens_NH: torch.Tensor
    tokens_per_expert_L: torch.Tensor
    probs_N: torch.Tensor
    handle: Any
    status: Optional[torch.Tensor] = None
    fp8: Any = None
    check: Any = None


# Status bits of a budget-mode dispatch (``DispatchResult.status``), one meaning everywhere.
STATUS_ROWS_DROPPED = 1      # this rank received more rows than max_rows_per_rank
STATUS_TOKENS_DROPPED = 2    # some rank sent more tokens than the backend's token budget
STATUS_BAD_INPUT = 4         # some rank's dispatch input was invalid (see raise_on_status)
STATUS_BARRIER_TIMEOUT = 8   # a device barrier gave up waiting for a peer (a peer died)
STATUS_BITS = (STATUS_ROWS_DROPPED, STATUS_TOKENS_DROPPED, STATUS_BAD_INPUT,
               STATUS_BARRIER_TIMEOUT)
STATUS_OVERFLOW = STATUS_ROWS_DROPPED | STATUS_TOKENS_DROPPED


def describe_status(bits: int) -> str:
    """A one-line reading of ``STATUS_*`` bits, e.g. for logs."""
    names = {STATUS_ROWS_DROPPED: "rows dropped over max_rows_per_rank",
             STATUS_TOKENS_DROPPED: "tokens dropped over the token budget",
             STATUS_BAD_INPUT: "invalid dispatch input on some rank",
             STATUS_BARRIER_TIMEOUT: "a device barrier timed out (a peer stopped)"}
    said = [text for bit, text in names.items() if bits & bit]
    return "; ".join(said) if said else "ok"


@runtime_checkable
class Backend(Protocol):
    """A token dispatch backend. One file per backend under ``moe_dispatch/backends``.

    ``__init__(self, config: BackendConfig)`` builds it (may allocate communication buffers).
    ``availability()`` is a classmethod: ``None`` when usable on this machine, else a
    one-line reason naming what to install.
    ``supported_wire_dtypes`` (optional class attribute, default none): the
    ``BackendConfig.wire_dtype`` values it implements; any other non-None value is refused
    at construction (``check_wire_dtype``), never silently moved in the input's dtype.
    ``checks_in_message`` (optional attribute, default False): the backend's ``dispatch``
    makes the value check of the top-k ids and probs itself, in data it reads before its
    first sync anyway, and raises on every rank there; the dispatcher then leaves the check
    to it (``PendingCheck.in_message``; the exact mode of ``alltoall`` / ``allgather``).
    """

    name: ClassVar[str]

    @classmethod
    def availability(cls) -> Optional[str]: ...

    def dispatch(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                 check: "PendingCheck") -> DispatchResult:
        """Send each token to the ranks owning its experts.

        x_TH:     [T, H] floating hidden states (T may be 0).
        idx_TK:   [T, K] int64 global expert ids in [-1, E), -1 = masked slot
                  (``canonicalize`` turns bad ids into -1 and flags them in ``check``;
                  with ``check.in_message`` they are unchecked, for the backend to check).
        probs_TK: [T, K] float32 routing probs; ignored (zero gradient) where masked.
        check:    input validation still pending: the backend must settle it on every
                  rank before its first data collective (see ``PendingCheck``), or make a
                  bad rank's collective harmless (fully masked rows of the agreed shape) and
                  settle right after it, so that a rank with bad input makes every rank
                  raise instead of hanging.
        Gradients must reach ``x_TH`` and ``probs_TK`` through the returned tokens / probs.
        """
        ...

    def combine(self, y_NH: torch.Tensor, handle: Any) -> torch.Tensor:
        """Return [T, H]: for each token the plain sum of its rows of ``y_NH``
        (padding rows ignored). Differentiable w.r.t. ``y_NH``."""
        ...


class DispatchInputError(ValueError):
    """Raised on every rank of the group when any rank's dispatch input is invalid."""


def check_wire_dtype(config: BackendConfig, backend) -> None:
    """Raise ``ValueError`` at construction unless ``backend`` (a backend class or instance)
    lists ``config.wire_dtype`` in its ``supported_wire_dtypes`` (None is always fine)."""
    wire = getattr(config, "wire_dtype", None)
    if wire is None or wire in getattr(backend, "supported_wire_dtypes", ()):
        return
    name = str(wire).replace("torch.", "")
    raise ValueError(f"wire_dtype={name} is not supported by backend "
                     f"{getattr(backend, 'name', type(backend).__name__)!r} yet; use backend "
                     f"'alltoall' or 'allgather' (they move {name} rows), or wire_dtype=None")


@dataclass(frozen=True)
class BudgetCheck:
    """Input validation of one budget-mode dispatch, to be raised later.

    A budget-mode dispatch never syncs the host, so a bad rank cannot make the others raise
    during the call: it takes part with its slots masked (its rows go nowhere), every rank
    sets ``STATUS_BAD_INPUT`` from the codes that rode in the data the ranks exchanged, and
    ``raise_on_status`` raises ``DispatchInputError`` on every rank where the caller reads
    the status (``MoETokenDispatcher.check_status``, or ``moe-train``'s once-per-step read).

    message: this rank's own error text: a host error (known bad), or the value check's
             text, which applies only when ``code`` reads nonzero; None when there is none.
    code:    None, or the 0-dim device code of this rank's value check (read only when the
             status says some input was bad, so the good path never syncs on it).
    """

    message: Optional[str]
    code: Optional[torch.Tensor] = None

    def mine(self) -> Optional[str]:
        """This rank's own error message, or None when its input was fine (a host read)."""
        if self.message is None:
            return None
        if self.code is not None and int(self.code.reshape(-1)[0].item()) == 0:
            return None
        return self.message


def raise_on_status(bits: int, checks=()) -> None:
    """Raise ``DispatchInputError`` if ``bits`` has ``STATUS_BAD_INPUT``.

    bits:   the OR of the statuses read (host int).
    checks: the ``BudgetCheck`` s of the dispatches those statuses came from; the first with
            a message names this rank's own error, else the error says another rank's input
            was bad.
    """
    if not bits & STATUS_BAD_INPUT:
        return
    for c in checks:
        mine = c.mine() if c is not None else None
        if mine:
            raise DispatchInputError(mine)
    raise DispatchInputError(
        "dispatch input invalid on another EP rank (budget mode: flagged in the status and "
        "raised here on every rank)")


@dataclass(frozen=True)
class PendingCheck:
    """Validation of one dispatch call that has not been agreed across ranks yet.

    host_error:  a message found on the host without touching device data (shapes,
                 dtypes), or None.
    device_bad:  a 0-dim int64 tensor, 1 when a value check failed (expert id out of
                 range, NaN/inf/negative prob), else 0; evaluated on the device, no sync.
                 (Other dtypes are accepted: nonzero = failed.)
    value_help:  text explaining what ``device_bad`` checked, for the error message.
    in_message:  the value check is still to do, by the backend's routing message
                 (``backends.exact.route_message(..., probs_TK=)``, the exact mode of
                 ``alltoall`` / ``allgather``): the ids and probs are unchecked, and bad
                 ids were not masked, so nothing may use them before that message's sync.
                 ``device_bad`` is None then.

    Backends that exchange counts anyway fold ``code()`` into that message and call
    ``raise_if_failed`` on the gathered codes: validation then costs no extra sync.
    Others call ``settle(group)``: one tiny all-reduce.
    """

    host_error: Optional[str]
    device_bad: Optional[torch.Tensor]
    value_help: str = ""
    in_message: bool = False

    def code(self, device: torch.device) -> torch.Tensor:
        """0-dim int64 on ``device``: 0 ok, 1 value error, 2 host (shape/dtype) error.
        Read-only: it may be ``device_bad`` itself or a cached zero."""
        if self.host_error is not None:
            return torch.tensor(2, dtype=torch.int64, device=device)
        bad = self.device_bad
        if bad is None:
            return _zero_code(device)
        if bad.dtype == torch.int64:
            return bad.to(device)  # already 0/1: no launch on its own device
        return (bad != 0).to(torch.int64).to(device)

    def raise_if_failed(self, codes: list[int], my_rank: int) -> None:
        """Raise ``DispatchInputError`` on every rank if any code is nonzero."""
        bad = [r for r, c in enumerate(codes) if c]
        if not bad:
            return
        mine = codes[my_rank] if my_rank < len(codes) else 0
        if mine == 2:
            raise DispatchInputError(self.host_error)
        if mine == 1:
            raise DispatchInputError(self.value_help)
        raise DispatchInputError(
            f"dispatch input invalid on EP rank(s) {bad}; this rank's input was fine "
            "(every rank raises so that none hangs in a collective)")

    def settle(self, group, device: torch.device) -> None:
        """One all-gather of the codes, then ``raise_if_failed`` (one host sync)."""
        code = self.code(device).reshape(1)
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            self.raise_if_failed([int(code.item())], 0)
            return
        world = dist.get_world_size(group)
        out = torch.empty(world, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(out, code, group=group) if device.type == "cuda" else \
            dist.all_gather(list(out.chunk(world)), code, group=group)
        self.raise_if_failed(out.tolist(), dist.get_rank(group))


_zero_codes: dict = {}


def _zero_code(device: torch.device) -> torch.Tensor:
    """A cached read-only 0-dim int64 zero per device (the code of an unchecked call),
    so a call with ``check_inputs=False`` costs no fill launch. Not cached while a CUDA
    graph is being captured (its fill would run only inside the graph)."""
    key = (device.type, device.index)
    z = _zero_codes.get(key)
    if z is None:
        z = torch.zeros((), dtype=torch.int64, device=device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _zero_codes[key] = z
    return z
