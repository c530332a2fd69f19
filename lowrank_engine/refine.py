"""Block refinement (AA-SVD stage 2): after a block's linears are factorized, jointly tune its factors
and norms so that Block'(X') matches Block(X), the dense block on the dense inputs. Upstream blocks
stay frozen; memory is this block plus the two streams it already has.

Defaults are the published ones: AdamW, lr 1e-4, weight decay 0.01 on the factors, 10% linear warm-up,
then cosine decay to 0.1× the peak, gradient clip 1.0, 25 passes over the calibration set. Norm weights
get no decay (the usual convention): decay would pull LLaMA's scales w toward 0 and Gemma's (1 + w)
scales toward 1, neither of which is a prior worth having.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from lowrank_engine import distributed, models
from lowrank_engine.config import CompressionConfig
from lowrank_engine.modules import LowRankLinear
from lowrank_engine.probe import slice_kwargs


def factor_and_norm_parameters(block: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the factors of every LowRankLinear, the weights of every norm). Norms are found by class name,
    so any architecture's RMSNorm/LayerNorm qualifies; attention internals stay frozen."""
    factors, norms = [], []
    for module in block.modules():
        if isinstance(module, LowRankLinear):
            factors += [module.U, module.V]
        elif "norm" in type(module).__name__.lower():
            norms += [p for p in module.parameters(recurse=False)]
    return factors, norms


def kept_dense_parameters(blocks) -> list[nn.Parameter]:
    """The weights and biases of the linears in `blocks` that the allocation kept dense."""
    return [p for block in blocks for linear in models.block_linears(block).values()
            if not isinstance(linear, LowRankLinear) for p in linear.parameters(recurse=False)]


def parameter_groups(module: nn.Module, cfg: CompressionConfig, blocks=None) -> list[dict]:
    """AdamW groups: the factors decay with `cfg.refine_weight_decay`; the norm weights, and the dense linears
    of `blocks` (default: `module` is one block) when `cfg.refine_dense_lr_ratio` trains them at that fraction
    of the learning rate, not at all: decay would pull pretrained weights toward 0, not a prior worth having."""
    factors, norms = factor_and_norm_parameters(module)
    dense = kept_dense_parameters([module] if blocks is None else blocks) if cfg.refine_dense_lr_ratio > 0 else []
    groups = ({"params": factors, "weight_decay": cfg.refine_weight_decay, "lr_scale": 1.0},
              {"params": norms, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": dense, "weight_decay": 0.0, "lr_scale": cfg.refine_dense_lr_ratio})
    return [group for group in groups if group["params"]]


def group_parameters(groups: list[dict]) -> list[nn.Parameter]:
    """Every parameter of `groups` (from parameter_groups), in order: what gets gradients and is clipped."""
    return [p for group in groups for p in group["params"]]


def trainable_parameters(module: nn.Module, cfg: CompressionConfig, blocks=None) -> list[nn.Parameter]:
    return group_parameters(parameter_groups(module, cfg, blocks))


def _float_kwargs(kwargs: dict) -> dict:
    """Rotary tables and masks in fp32 to match the fp32 block (SDPA rejects a bf16 mask on fp32 queries)."""
    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.float()
        if isinstance(v, (tuple, list)):
            return type(v)(cast(x) for x in v)
        return v
    return {k: cast(v) for k, v in kwargs.items()}


@torch.no_grad()
def balance_factors(block: nn.Module) -> None:
    """Give every rank component equal norms in U and V; U Vᵀ is unchanged. The whitened solve leaves V
    scaled by L⁻ᵀ (tiny when activations are large) and U by L, and Adam's steps are about lr per entry
    whatever the entry's size: unbalanced, one step of 1e-4 can be a 100% change of V."""
    for module in block.modules():
        if isinstance(module, LowRankLinear):
            scale = (module.V.norm(dim=0) / module.U.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
            module.U.mul_(scale)
            module.V.div_(scale)


def adamw(params: list, cfg: CompressionConfig) -> torch.optim.Optimizer:
    """AdamW with its fused kernel where the device has one: the default per-tensor loop took 11 ms a
    step on 2 CPU cores for a SmolLM2 block's 16 tensors, the fused step 1 ms (the best preset takes
    192 steps per block). `params`: parameters or parameter groups (a group's own weight decay wins)."""
    try:
        return torch.optim.AdamW(params, lr=cfg.refine_lr, weight_decay=cfg.refine_weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=cfg.refine_lr, weight_decay=cfg.refine_weight_decay)


def learning_rate(step: int, total: int, cfg: CompressionConfig, peak: Optional[float] = None) -> float:
    """Linear warm-up to `peak` (default cfg.refine_lr), then cosine decay to cfg.refine_final_lr_ratio × peak."""
    peak = cfg.refine_lr if peak is None else peak
    warm = math.ceil(cfg.refine_warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return peak * (cfg.refine_final_lr_ratio + (1 - cfg.refine_final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def trained_in_fp32(module: nn.Module, params: list):
    """Within the context, `module` is fp32 with gradients for `params` only (the optimizer state and
    updates are fp32 even in a bf16 model); on exit every tensor gets its dtype and flag back."""
    param_state = {n: (p.dtype, p.requires_grad) for n, p in module.named_parameters()}
    buffer_dtypes = {n: b.dtype for n, b in module.named_buffers()}
    module.float()
    module.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for name, p in module.named_parameters():
            dtype, flag = param_state[name]
            p.grad = None
            p.data = p.data.to(dtype)
            p.requires_grad_(flag)
        for name, b in list(module.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            (module.get_submodule(owner) if owner else module)._buffers[leaf] = b.to(buffer_dtypes[name])


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, loss: torch.Tensor, cfg: CompressionConfig,
                   lr: float, average_over_ranks: bool = False) -> float:
    """One clipped AdamW step at `lr` on `loss`; returns the loss. `average_over_ranks`: average the gradients
    of every process first (each took the step on its own windows)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # a plain parameter list trains at `lr`
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if average_over_ranks and distributed.active():
        for p in params:
            if p.grad is None:  # every rank must join every all-reduce
                p.grad = torch.zeros_like(p)
            distributed.all_reduce_sum_(p.grad)
            p.grad /= distributed.world_size()
    torch.nn.utils.clip_grad_norm_(params, cfg.refine_clip)
    optimizer.step()
    return float(loss.detach())


def refine_block(block: nn.Module, inputs, targets, kwargs: list, device, cfg: CompressionConfig,
                 run_block) -> dict:
    """Minimize mean ‖Block'(X') − Block(X)‖² over the batches in place; returns the first and last pass's
    mean loss. `inputs` (X') and `targets` (Block(X)) are streams of per-batch tensors."""
    batches = []
    tokens = 0
    for b in range(len(inputs)):
        if cfg.refine_tokens is not None and tokens >= cfg.refine_tokens:
            break
        batches.append(b)
        tokens += inputs[b].shape[0] * inputs[b].shape[1]
    # every rank takes the same number of steps on its own windows; gradients are averaged
    batches = batches[:int(-distributed.all_reduce_max(-float(len(batches))))]
    # (batch, window slice) per optimizer step: smaller steps give more updates for the same FLOPs
    steps = [(b, slice(s, s + (cfg.refine_micro_batch or inputs[b].shape[0])))
             for b in batches for s in range(0, inputs[b].shape[0], cfg.refine_micro_batch or inputs[b].shape[0])]
    groups = parameter_groups(block, cfg)
    params = group_parameters(groups)
    factorized = any(isinstance(m, LowRankLinear) for m in block.modules())
    if not factorized or not steps or cfg.refine_passes == 0:  # a block kept dense is not tuned
        return {"first_loss": float("nan"), "last_loss": float("nan"), "steps": 0}
    total = cfg.refine_passes * len(steps)
    losses = []
    step = 0
    with trained_in_fp32(block, params), torch.enable_grad():
        balance_factors(block)
        optimizer = adamw(groups, cfg)
        for _ in range(cfg.refine_passes):
            pass_loss = 0.0
            for b, part in steps:
                x = inputs[b][part].to(device).float()
                out = run_block(block, x, _float_kwargs(slice_kwargs(kwargs[b], inputs[b].shape[0], part)), device)
                loss = torch.nn.functional.mse_loss(out, targets[b][part].to(device).float())
                pass_loss += optimizer_step(optimizer, params, loss, cfg, learning_rate(step, total, cfg),
                                            average_over_ranks=True)
                step += 1
            losses.append(pass_loss / len(steps))
    return {"first_loss": losses[0], "last_loss": losses[-1], "steps": step}
