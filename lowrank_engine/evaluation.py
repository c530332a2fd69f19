"""Perplexity (DESIGN §4) and data-free fidelity against the dense model."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False, desc: str = "ppl") -> torch.Tensor:
    """Mean next-token NLL of each window (over its seqlen−1 predicted tokens)."""
    device, out = _device(model), []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(ids.shape[0], -1).mean(1).cpu())
    return torch.cat(out)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False, desc: str = "ppl") -> float:
    """exp of the mean over windows of each window's mean NLL (DESIGN §4)."""
    mean_nll = float(window_nll(model, windows, batch_size, progress, desc).mean())
    return math.exp(mean_nll) if mean_nll < 700 else math.inf  # exp overflows past ~709.8


@torch.no_grad()
def fidelity(dense, compressed, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    """KL(p_dense ‖ p_compressed) per token and top-1 agreement of the next-token distributions."""
    kl_sum, agree, tokens = 0.0, 0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="fidelity", disable=not progress, leave=False):
        ids = windows[start:start + batch_size]
        p = F.log_softmax(dense(input_ids=ids.to(_device(dense)), use_cache=False).logits.float(), -1)
        q = F.log_softmax(compressed(input_ids=ids.to(_device(compressed)), use_cache=False).logits.float(), -1).to(p.device)
        kl_sum += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += ids.numel()
    return {"kl": kl_sum / tokens, "top1_agreement": agree / tokens, "tokens": tokens}
