"""Fused GPU kernels behind ``moe_dispatch.permute`` (Triton, CUDA only).

``use_triton(t)`` decides per call; the plain torch path stays the reference and the CPU path.
"""
from __future__ import annotations

import torch


def use_triton(t: torch.Tensor) -> bool:
    return False


def permute(x_NH, probs_NK, plan):  # pragma: no cover - replaced by the Triton implementation
    raise NotImplementedError


def unpermute(y_MH, plan):  # pragma: no cover
    raise NotImplementedError
