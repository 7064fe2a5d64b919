"""Hugging Face transformers MoE models with expert parallelism through ``MoETokenDispatcher``.

    from token_dispatcher.hf import apply_expert_parallel
    model = AutoModelForCausalLM.from_config(cfg)           # or .from_pretrained(path)
    apply_expert_parallel(model, backend="alltoall")         # every rank; returns blocks replaced

Shapes: T tokens, H hidden, I expert ffn width, E experts, L local experts, K top-k,
N dispatched rows.

What changes: in every sparse-MoE block, the ``experts`` module (transformers keeps all E
experts there as fused 3-D parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I]) is replaced by ``EPExperts``, which holds only this EP rank's slice
(expert e on rank e // (E // R)) under the same parameter names, and moves each token to
its experts' ranks and back through the dispatcher. The experts module is called by the
block with the routing the model's own router computed, so everything else stays the
model's: router/gate module and its parameter names, scores, top-k, normalisation, score
bias and group-limited top-k (DeepSeek-V3), jitter, shared experts (run locally), the
router-logit recording behind the aux loss. Parameter names do not change; only the
experts' first dimension becomes L.

Checkpoints: ``save_pretrained_ep`` gathers the experts and writes an ordinary transformers
checkpoint (plain ``from_pretrained`` loads it); ``load_ep_state`` loads an ordinary
checkpoint (or state dict, or plain model) into an EP model.

Needs transformers 5 (fused experts); 4.x keeps experts as a ``ModuleList`` and is refused.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("token_dispatcher.hf needs transformers: "
                      "pip install 'moe-dispatch[hf]'") from exc

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .dispatcher import MoETokenDispatcher
from .experts import IMPLS, grouped_mm_fn

__all__ = ["SUPPORTED", "EPExperts", "apply_expert_parallel", "ep_experts",
           "expert_parameters", "gather_state_dict", "save_pretrained_ep", "load_ep_state"]

# model_type -> the transformers classes whose sparse-MoE blocks are replaced (for messages).
SUPPORTED: Dict[str, str] = {
    "qwen3_moe": "Qwen3MoeForCausalLM / Qwen3MoeModel (Qwen3MoeSparseMoeBlock)",
    "mixtral": "MixtralForCausalLM / MixtralModel (MixtralSparseMoeBlock)",
    "olmoe": "OlmoeForCausalLM / OlmoeModel (OlmoeSparseMoeBlock)",
    "deepseek_v3": "DeepseekV3ForCausalLM / DeepseekV3Model (DeepseekV3MoE, shared experts "
                   "kept local)",
}


def _supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())


class EPExperts(nn.Module):
    """This EP rank's slice of a transformers fused-experts module, run over the dispatcher.

    Called like the module it replaces: ``forward(hidden_states [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H]``, each token the sum of its K experts' outputs times
    their weights.

    Parameters (the replaced module's names, first dimension L instead of E):
      gate_up_proj [L, 2I, H]: gate rows then up rows (y = act(x Wg^T) * (x Wu^T)).
      down_proj    [L, H, I].

    experts:    the transformers experts module to take the slice from (not kept).
    dispatcher: a ``MoETokenDispatcher`` for E experts; it decides the local slice
                (``local_expert_offset``, ``num_local_experts``) and may be shared by layers.
    impl:       "auto" | "grouped_mm" | "loop", as in ``token_dispatcher.experts``: one
                grouped GEMM per projection for bf16 rows on CUDA, a per-expert loop on CPU
                and for fp32 rows.
    """

    def __init__(self, experts: nn.Module, dispatcher: MoETokenDispatcher, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"expert impl must be one of {IMPLS}, got {impl!r}")
        E = experts.gate_up_proj.shape[0]
        if dispatcher.num_experts != E:
            raise ValueError(f"dispatcher is built for {dispatcher.num_experts} experts, the "
                             f"model's experts module holds {E}")
        L, off = dispatcher.num_local_experts, dispatcher.local_expert_offset
        self.num_experts, self.num_local_experts, self.local_expert_offset = E, L, off
        self.hidden_dim = experts.gate_up_proj.shape[2]
        self.intermediate_dim = experts.down_proj.shape[2]
        self.act_fn = experts.act_fn
        self.impl = impl
        self.dispatcher = dispatcher
        with torch.no_grad():
            self.gate_up_proj = nn.Parameter(experts.gate_up_proj[off:off + L].clone(),
                                             experts.gate_up_proj.requires_grad)
            self.down_proj = nn.Parameter(experts.down_proj[off:off + L].clone(),
                                          experts.down_proj.requires_grad)

    def extra_repr(self) -> str:
        first, last = self.local_expert_offset, self.local_expert_offset + self.num_local_experts
        return (f"experts [{first}, {last}) of {self.num_experts}, hidden={self.hidden_dim}, "
                f"intermediate={self.intermediate_dim}, impl={self.impl!r}")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index [T, K] int, top_k_weights [T, K] -> [T, H] in
        hidden_states' dtype (as the transformers experts return it)."""
        x_TH = hidden_states
        dev = x_TH.device.type
        if torch.is_autocast_enabled(dev):
            # The block's input stays fp32 under autocast (fp32 residual stream); move and
            # compute the rows in the autocast dtype, as MoELayer does: half the bytes, and
            # "auto" then picks the grouped GEMM for bf16 on CUDA.
            x_TH = x_TH.to(torch.get_autocast_dtype(dev))
        out = self.dispatcher.dispatch(x_TH, topk_idx=top_k_index, topk_probs=top_k_weights)
        y_NH = self.run_local(out.tokens, out.tokens_per_expert, out.probs)
        return self.dispatcher.combine(y_NH, out.handle).to(hidden_states.dtype)

    def resolved_impl(self, x_NH: torch.Tensor) -> str:
        """The implementation ``run_local`` uses for rows like ``x_NH``."""
        if self.impl != "auto":
            return self.impl
        if x_NH.is_cuda and x_NH.dtype == torch.bfloat16 and grouped_mm_fn() is not None:
            return "grouped_mm"
        return "loop"

    def run_local(self, x_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor,
                  probs_N: torch.Tensor) -> torch.Tensor:
        """The local experts on their rows.

        x_NH:                [N, H] rows grouped by local expert, ascending (dispatch order).
        tokens_per_expert_L: [L] int64 rows per local expert.
        probs_N:             [N] float32 routing weight of each row, multiplied in as the
                             transformers experts do (in the promoted dtype, then cast back).
        Every local expert's weights get a gradient (zeros without rows).
        """
        if self.resolved_impl(x_NH) == "loop" or x_NH.shape[0] == 0:
            y_NH = self._loop(x_NH, tokens_per_expert_L)
        else:
            y_NH = self._grouped(x_NH, tokens_per_expert_L)
        return (y_NH * probs_N.unsqueeze(-1)).to(x_NH.dtype)

    def _loop(self, x_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(int(c) for c in tokens_per_expert_L.tolist()):
            # Zero-row experts run on [0, H] too: their weights get a zero gradient, not None.
            x_nH = x_NH[start:start + n]
            gate, up = F.linear(x_nH, self.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(self.act_fn(gate) * up, self.down_proj[e]))
            start += n
        return torch.cat(outs, 0)

    def _grouped(self, x_NH: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        gmm = grouped_mm_fn()
        if gmm is None:
            raise RuntimeError(f"expert impl 'grouped_mm' needs torch>=2.8 (this is "
                               f"{torch.__version__}); use impl='loop'")
        if x_NH.is_cuda and (self.hidden_dim % 8 or self.intermediate_dim % 8):
            raise ValueError(f"grouped_mm on CUDA needs hidden ({self.hidden_dim}) and "
                             f"intermediate ({self.intermediate_dim}) sizes that are multiples "
                             "of 8 (16-byte aligned bf16 rows), or impl='loop'")
        offs_L = torch.cumsum(tokens_per_expert_L.to(torch.int64), 0).to(
            device=x_NH.device, dtype=torch.int32, non_blocking=True)
        dt = torch.bfloat16 if x_NH.is_cuda else x_NH.dtype
        # transformers stores [out, in] (F.linear layout); grouped_mm takes [L, in, out].
        w_gu, w_d = (w.to(dt).transpose(-2, -1) for w in (self.gate_up_proj, self.down_proj))
        gate, up = gmm(x_NH.to(dt), w_gu, offs=offs_L).chunk(2, dim=-1)
        return gmm(self.act_fn(gate) * up, w_d, offs=offs_L)


def _is_fused_experts(mod: Any) -> bool:
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (isinstance(mod, nn.Module) and isinstance(gu, nn.Parameter) and gu.dim() == 3
            and isinstance(dn, nn.Parameter) and dn.dim() == 3)


def _moe_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, block) of every sparse-MoE block: a module with a ``gate`` and an ``experts``
    module holding fused 3-D expert weights."""
    out = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if isinstance(experts, EPExperts):
            raise ValueError(f"{name or 'model'} is already expert-parallel "
                             "(apply_expert_parallel was called on this model before)")
        if hasattr(mod, "gate") and _is_fused_experts(experts):
            out.append((name, mod))
    return out


def _check_layout(name: str, experts: nn.Module) -> None:
    """The fused layout EPExperts computes: concatenated [gate; up], [out, in], no bias,
    no post-expert norm (flags set by transformers' ``use_experts_implementation``)."""
    want = dict(is_concatenated=True, is_transposed=False, has_bias=False, has_gate=True,
                has_post_expert_norm=False)
    bad = {k: getattr(experts, k) for k, v in want.items() if getattr(experts, k, v) != v}
    E, I2, H = experts.gate_up_proj.shape
    if experts.down_proj.shape != (E, H, I2 // 2):
        bad["down_proj.shape"] = tuple(experts.down_proj.shape)
    if bad:
        raise NotImplementedError(f"{name}: {type(experts).__name__} has an expert layout "
                                  f"token_dispatcher.hf does not run ({bad})")


def apply_expert_parallel(model: nn.Module, ep_group=None, backend: str = "alltoall", *,
                          dispatcher: Optional[MoETokenDispatcher] = None,
                          expert_impl: str = "auto", **dispatcher_kwargs) -> int:
    """Make every sparse-MoE block of a transformers model expert-parallel, in place.

    model:             a supported transformers model (``SUPPORTED``: Qwen3-MoE, Mixtral,
                       OLMoE, DeepSeek-V3; the ``*ForCausalLM`` or the base model), holding
                       all E experts, the same weights on every rank of the EP group (build
                       it from the same seed or checkpoint everywhere).
    ep_group:          the expert-parallel process group (None = WORLD).
    backend:           dispatcher backend name (``MoETokenDispatcher``).
    dispatcher:        use this ``MoETokenDispatcher`` instead of building one (then
                       ``ep_group``, ``backend`` and ``dispatcher_kwargs`` must be left out).
    expert_impl:       "auto" | "grouped_mm" | "loop" (``EPExperts``).
    dispatcher_kwargs: passed to ``MoETokenDispatcher`` (capacity_factor, pad_multiple, ...).

    Collective over the EP group (the dispatcher's construction check). Returns the number
    of blocks made expert-parallel. Raises ``ValueError`` naming the supported families for
    any other model, and for a supported family whose blocks are not in transformers 5's
    fused-experts layout.
    """
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"apply_expert_parallel: {type(model).__name__} (model_type "
                         f"{model_type!r}) is not supported; supported: {_supported_list()}")
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError(f"apply_expert_parallel: no sparse-MoE block with fused experts "
                         f"(gate_up_proj / down_proj) in {type(model).__name__}; "
                         f"token_dispatcher.hf needs transformers>=5 (this is "
                         f"{transformers.__version__}), where {model_type} keeps its experts "
                         "as 3-D parameters")
    for name, blk in blocks:
        _check_layout(f"{name}.experts", blk.experts)
    sizes = {blk.experts.gate_up_proj.shape[0] for _, blk in blocks}
    if len(sizes) != 1:
        raise ValueError(f"apply_expert_parallel: blocks hold different expert counts {sizes}")
    E = sizes.pop()
    if dispatcher is None:
        dispatcher = MoETokenDispatcher(E, ep_group=ep_group, backend=backend,
                                        **dispatcher_kwargs)
    elif ep_group is not None or backend != "alltoall" or dispatcher_kwargs:
        raise ValueError("apply_expert_parallel: pass either dispatcher= or the arguments "
                         "to build one (ep_group, backend, dispatcher kwargs), not both")
    if getattr(dispatcher, "max_rows_per_rank", None) is not None:
        # Its per-dispatch overflow status would go unread inside the transformers block.
        raise ValueError("apply_expert_parallel: the budget mode (max_rows_per_rank) is not "
                         "supported for transformers models yet; use the exact mode")
    for _, blk in blocks:
        blk.experts = EPExperts(blk.experts, dispatcher, impl=expert_impl)
    return len(blocks)


def ep_experts(model: nn.Module) -> Iterator[Tuple[str, EPExperts]]:
    """(module name, ``EPExperts``) of every expert-parallel block of ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, EPExperts))


def expert_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """(name, parameter) of the routed experts' weights: sharded over EP (and replicated
    over data parallel); every other parameter is the same on every rank."""
    for prefix, mod in ep_experts(model):
        for n, p in mod.named_parameters(recurse=False):
            yield f"{prefix}.{n}", p


def _expert_keys(model: nn.Module) -> Dict[str, EPExperts]:
    return {name: mod for prefix, mod in ep_experts(model)
            for name in (f"{prefix}.gate_up_proj", f"{prefix}.down_proj")}


@torch.no_grad()
def gather_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The unsharded state dict of an EP model (the experts all-gathered over their EP group,
    everything else as it is): what the plain transformers model would hold.

    Collective over every EP group the model's experts use: each of its ranks calls it.
    """
    sd = model.state_dict()
    for key, mod in _expert_keys(model).items():
        local = sd[key].contiguous()
        group = mod.dispatcher.ep_group
        R = mod.dispatcher.ep_size
        if R > 1:
            parts = [torch.empty_like(local) for _ in range(R)]
            dist.all_gather(parts, local, group=group)
            sd[key] = torch.cat(parts, 0)
        else:
            sd[key] = local.clone()
    return sd


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_pretrained_ep(model: nn.Module, path: Union[str, os.PathLike],
                       **save_kwargs) -> None:
    """Save an EP model as an ordinary transformers checkpoint (experts gathered), which
    plain ``AutoModelForCausalLM.from_pretrained(path)`` loads.

    Collective: every rank calls it; global rank 0 writes (``model.save_pretrained(path,
    state_dict=..., **save_kwargs)``, so transformers' own format rules apply), then all
    ranks wait for the files.
    """
    sd = gather_state_dict(model)
    if _is_main():
        model.save_pretrained(path, state_dict={k: v.cpu() for k, v in sd.items()},
                              **save_kwargs)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def load_ep_state(model: nn.Module, source: Union[str, os.PathLike, Mapping, nn.Module],
                  **from_pretrained_kwargs) -> None:
    """Load unsharded weights into an EP model, in place (each rank keeps its experts' slice).

    source: a checkpoint (path or hub id: read with ``type(model).from_pretrained(source,
            **from_pretrained_kwargs)``, which applies transformers' own checkpoint
            conversions), a plain model, or its ``state_dict()``.
    Every key of the EP model must be in the source and vice versa (``KeyError`` naming the
    difference); expert weights must have E rows. Parameters keep their identity, so an
    optimizer built on the model stays valid. Not collective.
    Loading into a plain model first and calling ``apply_expert_parallel`` on it is the other
    way; both give the same EP model.
    """
    if isinstance(source, Mapping):
        full = dict(source)
    elif isinstance(source, nn.Module):
        full = source.state_dict()
    else:
        full = type(model).from_pretrained(source, **from_pretrained_kwargs).state_dict()
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(full)), sorted(set(full) - set(own))
    if missing or unexpected:
        raise KeyError(f"load_ep_state: keys missing from the source {missing[:8]}, "
                       f"unexpected in the source {unexpected[:8]}")
    experts = _expert_keys(model)
    for key, dst in own.items():
        src = full[key]
        mod = experts.get(key)
        if mod is not None:
            if src.shape[0] != mod.num_experts:
                raise ValueError(f"load_ep_state: {key} has {src.shape[0]} experts in the "
                                 f"source, the model has {mod.num_experts}")
            src = src[mod.local_expert_offset:mod.local_expert_offset + mod.num_local_experts]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"load_ep_state: {key} has shape {tuple(src.shape)} in the "
                             f"source, {tuple(dst.shape)} in the model")
        dst.copy_(src)
