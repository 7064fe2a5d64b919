"""Training a transformers MoE architecture: the recipe's ``model.hf`` (the hook in loop.py).

``model.hf: qwen3_moe`` (or mixtral, olmoe, deepseek_v3) trains that transformers model,
made expert-parallel by ``token_dispatcher.hf.apply_expert_parallel``, in place of our
``MoETransformer``. The model section's size keys set its config:

    vocab_size -> vocab_size              hidden -> hidden_size
    layers -> num_hidden_layers           heads -> num_attention_heads
    seq_len -> max_position_embeddings    num_experts -> the family's expert count
    top_k -> num_experts_per_tok          ffn_hidden -> the experts' width (and dense MLPs')
    init_std -> initializer_range         aux_loss_coeff -> router_aux_loss_coef
    rope_theta -> rope_parameters

``expert_impl`` picks how the local experts run. Any other field of the transformers config
goes in ``model.hf_config`` (e.g. ``n_group``, ``n_shared_experts``, ``norm_topk_prob``,
``num_key_value_heads``; small-model defaults are filled in: no special tokens, as many KV
heads as heads, head_dim = hidden / heads, and for deepseek_v3 small MLA ranks, no dense
first layers and n_group = topk_group = 1).
Routing is the architecture's own, so the keys of our router (score_func, norm_topk_prob,
score_bias, z_loss_coeff, shared_expert_hidden) and activation_checkpointing must stay at
their defaults; the recipe check says so.

The same seed gives the same global model on every rank and for every EP size: each rank
builds the whole model from the seed, then keeps its experts' slice.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator, List

import torch
import torch.nn as nn

from ..model import ModelConfig, ModelOutput

HF_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3")
# ModelConfig keys an HF model does not read: they must keep these defaults.
_NOT_FOR_HF = ("score_func", "norm_topk_prob", "score_bias", "bias_update_rate",
               "z_loss_coeff", "shared_expert_hidden", "activation_checkpointing")


def _family_fields(m: ModelConfig):
    """(fields the model section sets, overridable defaults) of the transformers config of
    family ``m.hf``."""
    hd = m.hidden // m.heads
    fixed = dict(vocab_size=m.vocab_size, hidden_size=m.hidden, num_hidden_layers=m.layers,
                 num_attention_heads=m.heads, max_position_embeddings=m.seq_len,
                 initializer_range=m.init_std, num_experts_per_tok=m.top_k,
                 rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta})
    # Bytes need no special tokens; the families' defaults name ids past a byte vocabulary.
    defaults = dict(num_key_value_heads=m.heads, bos_token_id=None, eos_token_id=None,
                    pad_token_id=None)
    aux = dict(router_aux_loss_coef=m.aux_loss_coeff)
    if m.hf == "qwen3_moe":
        fixed.update(num_experts=m.num_experts, moe_intermediate_size=m.ffn_hidden, **aux)
        defaults.update(intermediate_size=m.ffn_hidden, head_dim=hd)
    elif m.hf == "mixtral":
        fixed.update(num_local_experts=m.num_experts, intermediate_size=m.ffn_hidden, **aux)
        defaults.update(head_dim=hd)
    elif m.hf == "olmoe":
        fixed.update(num_experts=m.num_experts, intermediate_size=m.ffn_hidden, **aux)
    else:  # deepseek_v3: small-model attention (MLA) and plain top-k unless hf_config says
        fixed.update(n_routed_experts=m.num_experts, moe_intermediate_size=m.ffn_hidden)
        defaults.update(intermediate_size=m.ffn_hidden, first_k_dense_replace=0, n_group=1,
                        topk_group=1, q_lora_rank=m.hidden // 2, kv_lora_rank=m.hidden // 2,
                        qk_rope_head_dim=hd // 2, qk_nope_head_dim=hd // 2, v_head_dim=hd)
    return fixed, defaults


def hf_config(m: ModelConfig):
    """The transformers config of the model section ``m`` (``m.hf`` set). Raises
    ``ValueError`` naming the key for anything the section cannot mean, ``ImportError``
    naming the extra without transformers."""
    if m.hf not in HF_FAMILIES:
        raise ValueError(f"recipe key 'model.hf' must be one of {', '.join(HF_FAMILIES)}, "
                         f"got {m.hf!r}")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("recipe key 'model.hf' needs transformers: "
                          "pip install 'moe-dispatch[hf]'") from None
    defaults = ModelConfig()
    for key in _NOT_FOR_HF:
        if getattr(m, key) != getattr(defaults, key):
            raise ValueError(f"recipe key 'model.{key}' does not apply to model.hf models "
                             "(they route as their architecture does); set the transformers "
                             "config field in model.hf_config instead")
    if m.hf == "deepseek_v3" and m.aux_loss_coeff:
        raise ValueError("recipe key 'model.aux_loss_coeff': transformers' deepseek_v3 has no "
                         "aux loss (it balances with e_score_correction_bias); set it to 0")
    fields, extra = _family_fields(m)
    base = AutoConfig.for_model(m.hf)
    aliases = {k for k, v in getattr(base, "attribute_map", {}).items() if v in fields}
    for key, value in m.hf_config.items():
        if key in fields or key in aliases:
            raise ValueError(f"recipe key 'model.hf_config.{key}' is set by the model section "
                             "(model.hidden, num_experts, top_k, ...): set it there")
        if not hasattr(base, key):
            raise ValueError(f"recipe key 'model.hf_config.{key}': {type(base).__name__} has "
                             "no such field")
        extra[key] = value
    return AutoConfig.for_model(m.hf, **fields, **extra)


class HFMoEModel(nn.Module):
    """A transformers MoE causal LM, expert-parallel, seen through ``MoETransformer``'s
    interface (what the training loop reads).

    lm:          a supported transformers ``*ForCausalLM`` holding all experts (the same on
                 every rank); made expert-parallel in place.
    dispatcher:  the ``MoETokenDispatcher`` every MoE block uses.
    expert_impl: "auto" | "grouped_mm" | "loop".
    """

    def __init__(self, lm: nn.Module, dispatcher: nn.Module, expert_impl: str = "auto"):
        super().__init__()
        from ..hf import apply_expert_parallel, ep_experts
        if apply_expert_parallel(lm, dispatcher=dispatcher, expert_impl=expert_impl) == 0:
            raise ValueError(f"{type(lm).__name__} has no MoE layer")
        self.lm = lm
        # Plain lists: the modules are registered under ``lm`` already.
        self._experts = [mod for _, mod in ep_experts(lm)]
        self._gates = [blk.gate for blk in lm.modules()
                       if any(getattr(blk, "experts", None) is e for e in self._experts)]
        self.num_experts = dispatcher.num_experts
        self.aux_coeff = float(getattr(lm, "router_aux_loss_coef", 0.0) or 0.0)

    @property
    def blocks(self) -> List[SimpleNamespace]:
        """One view per MoE layer, ``blocks[i].moe.experts`` / ``.router`` as in
        ``MoETransformer`` (the loop's banner reads the experts' impl)."""
        return [SimpleNamespace(moe=SimpleNamespace(experts=e, router=g))
                for e, g in zip(self._experts, self._gates)]

    def routers(self) -> List[nn.Module]:
        return list(self._gates)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        return (p for e in self._experts for p in e.parameters(recurse=False))

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        ids = {id(p) for p in self.expert_parameters()}
        return (p for p in self.parameters() if id(p) not in ids)

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        """tokens_BS: [B, S] int64 token ids. The loss terms and expert counts of this call."""
        idx_LTK: List[torch.Tensor] = []
        # The experts' inputs carry the routing the model's own router chose; recorded for
        # this call only (a recompute in backward is not recorded twice).
        hooks = [e.register_forward_pre_hook(lambda mod, args: idx_LTK.append(args[1]))
                 for e in self._experts]
        try:
            out = self.lm(input_ids=tokens_BS, use_cache=False,
                          output_router_logits=self.aux_coeff > 0)
        finally:
            for h in hooks:
                h.remove()
        logits_BSV = out.logits.float()
        zero = logits_BSV.new_zeros(())
        aux = getattr(out, "aux_loss", None)
        aux = zero if aux is None else self.aux_coeff * aux.float()
        counts_NE = torch.stack([torch.bincount(i.reshape(-1), minlength=self.num_experts)
                                 for i in idx_LTK])
        return ModelOutput(logits_BSV, aux, zero, counts_NE)


def build_hf_model(m: ModelConfig, dispatcher: nn.Module, seed: int = 0) -> HFMoEModel:
    """The recipe's HF model: the whole model drawn from ``seed`` (the caller's RNG state is
    left as it was), then this rank's experts kept."""
    from transformers import AutoModelForCausalLM
    cfg = hf_config(m)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        lm = AutoModelForCausalLM.from_config(cfg)
    return HFMoEModel(lm, dispatcher, m.expert_impl)


def check_recipe(r) -> None:
    """Recipe-time checks of a ``model.hf`` recipe (``ValueError`` / ``ImportError`` naming
    the key), so that a bad one is refused before any rank starts."""
    budget = getattr(r, "max_rows_per_rank", None)
    if budget is not None or getattr(r.train, "cuda_graph", False):
        raise ValueError("recipe keys 'max_rows_per_rank' and 'train.cuda_graph' are not "
                         "supported with model.hf yet (exact mode only)")
    hf_config(r.model)
