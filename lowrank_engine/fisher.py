"""FWSVD's statistic: the empirical Fisher information of each linear's weights, from gradients of the
calibration loss. This is the one statistic that needs backpropagation, so the whole model must be in
memory once (fine for the models FWSVD is compared on; the streamed methods need no gradients).

For a linear W (m×n) it keeps the column sums f_j = Σ_batches Σ_i (∂L/∂W_ij)², so that the solver's
diagonal metric H = diag(f) weighs the error of input channel j by its Fisher mass (DESIGN §1).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_engine.models import block_linears, find_decoder_blocks


def column_fisher(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1, device="cpu",
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Full module name → Σ_i (∂L/∂W_ij)² summed over calibration batches (next-token cross-entropy)."""
    blocks_name, blocks = find_decoder_blocks(model)
    linears = {f"{blocks_name}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}
    fisher = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    was_training = model.training
    model.eval()
    wanted = {id(m.weight) for m in linears.values()}
    saved = {}
    for p in model.parameters():  # gradients only where they are used
        saved[p] = p.requires_grad
        p.requires_grad_(id(p) in wanted)
    try:
        starts = range(0, input_ids.shape[0], batch_size)
        for start in tqdm(starts, desc="fisher", unit="batch", disable=not progress):
            ids = input_ids[start:start + batch_size].to(device)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            for name, m in linears.items():
                if m.weight.grad is None:
                    raise ValueError(f"no gradient reached {name}; FWSVD needs every linear on the loss path")
                fisher[name] += m.weight.grad.double().pow(2).sum(0).cpu()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return fisher
