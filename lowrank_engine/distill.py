"""Model distillation: after the last block, tune every factor and norm of the compressed model together so
that its next-token distribution matches the dense model's on the calibration windows (KL(dense ‖ compressed)).

Block refinement matches each block's output given the compressed stream, one block at a time; the errors
that are left still compound through the depth. One short pass over the same calibration windows, with the
whole model in the graph, corrects what compounds (the global fine-tuning step of AQLM, Egiazarian et al.
2024, there after layer-wise quantization; here after block-wise factorization). No data beyond the
calibration windows is used, and the embeddings and head stay frozen.

The whole dense and compressed models must fit in memory at once (plus gradients and AdamW state for the
factors): this stage is for models that fit the device, not for streamed 70B runs.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowrank_engine import models, refine
from lowrank_engine.config import CompressionConfig
from lowrank_engine.memory import MemoryBudgetError, parse_budget
from lowrank_engine.pipeline import error_sums, errors_from_sums
from lowrank_engine.probe import StopForward, call_until_stopped, first_output


def memory_needed(dense_params: int, vocab_size: int, seqlen: int, windows_per_step: int) -> int:
    """Bytes distillation holds at its peak, an upper bound: the fp32 teacher; the student (at most as large) in
    fp32 with its gradients and two AdamW moments; three fp32 logit tensors of one step (the two models'
    and the gradient)."""
    return 4 * dense_params + 16 * dense_params + 3 * 4 * windows_per_step * seqlen * vocab_size


def device_memory(device: str) -> int:
    """Bytes free on `device` now (available physical memory on a CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def check_memory(dense_params: int, vocab_size: int, seqlen: int, cfg: CompressionConfig) -> None:
    """Refuse, before any compression work, a distillation whose two whole models cannot fit the device
    (its --max-memory budget, else what is free on it now)."""
    need = memory_needed(dense_params, vocab_size, seqlen, max(1, cfg.refine_micro_batch or 1))
    kind = torch.device(cfg.device).type
    budget = (parse_budget(cfg.max_memory, cfg.device) if cfg.max_memory else {}).get(kind)
    limit = f"--max-memory allows {_size(budget)} on {kind}" if budget else None
    if budget is None:
        budget = device_memory(cfg.device)
        limit = f"{kind} has {_size(budget)} free"
    if need > budget:
        raise MemoryBudgetError(f"distillation holds the dense and the compressed model whole: about {_size(need)}, "
                                f"but {limit}; pass --distill-passes 0 (the block stages stream one block at a time)")


def kl_to_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student), in fp32."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_q.flatten(0, -2), log_p.flatten(0, -2), log_target=True, reduction="batchmean")


def distill_model(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, cfg: CompressionConfig,
                  progress: bool = False) -> dict:
    """Tune `student`'s factors and norms in place (`cfg.distill_passes` passes of `cfg.refine_micro_batch`
    windows per AdamW step, peak lr `cfg.distill_lr`, refinement's warm-up, decay and clipping). Returns the
    first and last pass's mean KL and the seconds taken."""
    start = time.perf_counter()
    device = next(student.parameters()).device
    windows = max(1, cfg.refine_micro_batch or 1)
    order = torch.Generator().manual_seed(0)  # the same shuffled windows on every run
    steps_per_pass = -(-input_ids.shape[0] // windows)
    total = cfg.distill_passes * steps_per_pass
    if total == 0:
        return {"first_loss": float("nan"), "last_loss": float("nan"), "steps": 0, "seconds": 0.0}

    blocks = models.find_decoder_blocks(student)[1]
    groups = refine.parameter_groups(student, cfg, blocks)  # factors, norms (the final one too), kept dense linears
    params = refine.group_parameters(groups)
    losses, step = [], 0
    bar = tqdm(total=total, desc="distill", unit="step", disable=not progress)
    with refine.trained_in_fp32(student, params), torch.enable_grad():
        refine.balance_factors(student)
        optimizer = refine.adamw(groups, cfg)
        for _ in range(cfg.distill_passes):
            pass_loss = 0.0
            for chosen in torch.randperm(input_ids.shape[0], generator=order).split(windows):
                ids = input_ids[chosen].to(device)
                with torch.no_grad():
                    target = teacher(input_ids=ids, use_cache=False).logits
                loss = kl_to_dense(student(input_ids=ids, use_cache=False).logits, target)
                del target
                value = refine.optimizer_step(optimizer, params, loss, cfg,
                                              refine.learning_rate(step, total, cfg, cfg.distill_lr))
                pass_loss += value
                step += 1
                bar.update(1)
                bar.set_postfix_str(f"kl {value:.3f}")
            losses.append(pass_loss / steps_per_pass)
    bar.close()
    return {"first_loss": losses[0], "last_loss": losses[-1], "steps": step,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def block_output_errors(dense: nn.Module, compressed: nn.Module, input_ids: torch.Tensor,
                        batch_size: int = 8) -> list[tuple[float, float]]:
    """Each decoder block's output error (relative MSE, mean cosine distance) against the dense model's, both
    run end to end on the same windows: the per-block report of the model as distillation leaves it. Each
    forward stops after the last block (the head's logits would cost more than the blocks)."""
    def keep(outputs: list, last: bool):
        def hook(module, args, out):
            outputs.append(first_output(out))
            if last:
                raise StopForward
        return hook

    hooks, captured = [], {}
    for model in (dense, compressed):
        blocks = models.find_decoder_blocks(model)[1]
        captured[id(model)] = []
        hooks += [block.register_forward_hook(keep(captured[id(model)], i == len(blocks) - 1))
                  for i, block in enumerate(blocks)]
    sums = None
    try:
        for first in range(0, input_ids.shape[0], batch_size):
            for model in (dense, compressed):
                captured[id(model)].clear()
                ids = input_ids[first:first + batch_size].to(next(model.parameters()).device)
                call_until_stopped(lambda: model(input_ids=ids, use_cache=False))
            batch = torch.stack([error_sums(a, b) for a, b in zip(captured[id(dense)], captured[id(compressed)])])
            sums = batch if sums is None else sums + batch
    finally:
        for hook in hooks:
            hook.remove()
    return [errors_from_sums(row) for row in sums]
