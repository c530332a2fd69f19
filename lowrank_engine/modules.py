"""LowRankLinear: y = (x V) Uᵀ + b through the engine's ops layer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lowrank_engine import ops


class LowRankLinear(nn.Module):
    """A factorized nn.Linear replacement: U (out×rank), V (in×rank), optional bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dtype: Optional[torch.dtype] = None) -> "LowRankLinear":
        dtype = dtype or U.dtype
        module = cls(V.shape[0], U.shape[0], U.shape[1], bias is not None, device=U.device, dtype=dtype)
        with torch.no_grad():
            module.U.copy_(U)
            module.V.copy_(V)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.U.requires_grad or self.V.requires_grad):
            # training (block refinement): native autograd keeps x·V from the forward, so the backward
            # is 4 GEMMs instead of the custom op's 5 (its saved inputs exclude intermediates)
            return ops.lowrank_linear_reference(x, self.V, self.U, self.bias)
        return ops.lowrank_linear(x, self.V, self.U, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V.T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
