"""Calibration and evaluation text: named sets, local files, or the model itself.

Named sets read from the local data directory `LOWRANK_ENGINE_DATA` when it is set, and
from the Hugging Face hub through `datasets` otherwise. Split convention (DESIGN §4):
calibration from C4 docs[0:1000], held-out evaluation from C4 docs[1000:2000] and the
WikiText-2 test rows.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from lowrank_engine import models

logger = logging.getLogger("lowrank_engine")

NAMED_SETS = ("wikitext2", "c4")
C4_CALIBRATION_DOCS = (0, 1000)
C4_HELDOUT_DOCS = (1000, 2000)
# Windows for choosing a setting (a preset's ingredients, a schedule): from the calibration documents with
# another seed, so that no choice is tuned on the evaluation windows (DESIGN §4).
SELECTION_SET, SELECTION_SEED = "c4-select", 1
EVAL_SETS = NAMED_SETS + (SELECTION_SET,)


class DataError(ValueError):
    pass


@dataclass
class CalibrationSet:
    """Token windows [nsamples, seqlen] plus what produced them (saved with the checkpoint)."""
    input_ids: torch.Tensor
    source: str
    seed: int
    summary: dict = field(default_factory=dict)

    def describe(self) -> dict:
        n, t = self.input_ids.shape
        return {"source": self.source, "nsamples": n, "seqlen": t, "seed": self.seed, **self.summary}


def data_dir() -> Optional[str]:
    return os.environ.get("LOWRANK_ENGINE_DATA") or None


# --------------------------------------------------------------------------------------
# raw text
# --------------------------------------------------------------------------------------
def _read_parquet_texts(path: str, column: str = "text") -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[column])
    return [t for t in table.column(column).to_pylist() if t]


def _read_jsonl_texts(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            text = row.get("text") if isinstance(row, dict) else row if isinstance(row, str) else None
            if text is None:
                raise DataError(f"{path}:{lineno}: each JSONL row needs a 'text' field")
            texts.append(text)
    return texts


def read_text_file(path: str) -> str:
    """A local .txt, .jsonl or .parquet file as one string (documents joined by blank lines)."""
    if not os.path.exists(path):
        raise DataError(f"calibration file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                text = f.read()
        elif ext == ".jsonl":
            text = "\n\n".join(_read_jsonl_texts(path))
        elif ext == ".parquet":
            text = "\n\n".join(_read_parquet_texts(path))
        else:
            raise DataError(f"unsupported calibration file type {ext!r} (use .txt, .jsonl or .parquet)")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read calibration file {path}: {exc}") from exc
    if not text.strip():
        raise DataError(f"calibration file {path} is empty")
    return text


def _hub_dataset(hub_id: str, *args, **kwargs):
    """A data set from the Hugging Face hub; offline or unreachable gives one line naming the hub id
    and the local alternative."""
    try:
        from datasets import load_dataset

        return load_dataset(hub_id, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - offline, no network, no such data set: all the same to a user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load {hub_id} from the Hugging Face hub ({reason}); set LOWRANK_ENGINE_DATA to a "
                        "local data directory instead (see the README for its layout)") from exc


def _local(*parts: str) -> Optional[str]:
    root = data_dir()
    if root is None:
        return None
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise DataError(f"LOWRANK_ENGINE_DATA={root} has no {os.path.join(*parts)}")
    return path


def c4_documents(start: int, stop: int) -> list[str]:
    local = _local("c4", "c4_validation_2k.parquet")
    if local:
        docs = _read_parquet_texts(local)
    else:  # the real hub path
        ds = _hub_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                          split="validation")
        docs = ds["text"][:stop]
    if len(docs) < stop:
        raise DataError(f"C4 sample has {len(docs)} documents, need {stop}")
    return docs[start:stop]


def wikitext2_test_text() -> str:
    local = _local("wikitext2", "wikitext2_test_rows.json")
    if local:
        with open(local, encoding="utf-8") as f:
            rows = json.load(f)
    else:
        rows = _hub_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    return "\n\n".join(rows)


def wikitext2_train_text() -> str:
    root = data_dir()
    if root is not None:
        path = os.path.join(root, "wikitext2", "wikitext2_train_rows.json")
        if not os.path.exists(path):
            logger.warning("LOWRANK_ENGINE_DATA has no WikiText-2 train rows; calibrating on the test rows, "
                           "which overlap the WikiText-2 evaluation")
            return wikitext2_test_text()
        with open(path, encoding="utf-8") as f:
            return "\n\n".join(json.load(f))
    return "\n\n".join(_hub_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])


# --------------------------------------------------------------------------------------
# tokens and windows
# --------------------------------------------------------------------------------------
def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """DESIGN §4: starts = randint(0, len−seqlen−1, (nsamples,)) from a seeded generator."""
    if ids.numel() < seqlen + 2:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen} (+2)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen - 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def consecutive_windows(ids: torch.Tensor, count: int, seqlen: int) -> torch.Tensor:
    """The first `count` non-overlapping windows (evaluation)."""
    available = ids.numel() // seqlen
    if available == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    count = min(count, available)
    return ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def sample_from_model(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 64,
                      temperature: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Data-free calibration: sequences sampled from the model, starting from its BOS token; `batch_size`
    sequences decode together (larger matrix products, fewer sequential steps)."""
    from tqdm.auto import tqdm

    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise DataError("self-calibration needs a BOS or EOS token to start sampling from")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    bar = tqdm(total=nsamples * (seqlen - 1), desc=f"sampling {nsamples}×{seqlen} tokens", unit="tok",
               disable=not progress)
    for first in range(0, nsamples, batch_size):
        b = min(batch_size, nsamples - first)
        ids = torch.full((b, 1), start_id, dtype=torch.long, device=device)
        past = None
        for _ in range(seqlen - 1):
            bar.update(b)
            step, past = models.decode_step(model, ids[:, -1:] if past is not None else ids, past)
            logits = step.logits[:, -1].float()
            if not bool(torch.isfinite(logits).all()):  # finite weights, yet the forward overflowed
                raise DataError("NaN or Inf in the model's logits while sampling self-calibration text")
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).to(device)
            ids = torch.cat([ids, nxt], dim=1)
        out.append(ids.cpu())
    bar.close()
    return torch.cat(out)


def load_calibration(source: str, tokenizer, nsamples: int = 64, seqlen: int = 512, seed: int = 0,
                     model=None, progress: bool = False) -> CalibrationSet:
    """Calibration windows from `self`, `c4`, `wikitext2`, or a .txt/.jsonl/.parquet file."""
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples ≥ 1 and seqlen ≥ 2, got {nsamples}×{seqlen}")
    if source == "self":
        if model is None:
            raise DataError("self-calibration needs the model")
        ids = sample_from_model(model, tokenizer, nsamples, seqlen, seed, progress=progress)
        return CalibrationSet(ids, "self", seed, {"sampling": "temperature 1.0 from BOS"})
    if source == "c4":
        text = "\n\n".join(c4_documents(*C4_CALIBRATION_DOCS))
        summary = {"documents": f"c4 validation docs[{C4_CALIBRATION_DOCS[0]}:{C4_CALIBRATION_DOCS[1]}]"}
    elif source == "wikitext2":
        text = wikitext2_train_text()
        summary = {"documents": "wikitext-2-raw-v1 train"}
    elif os.path.splitext(source)[1].lower() in (".txt", ".jsonl", ".parquet") or os.path.exists(source):
        text = read_text_file(source)
        summary = {"documents": os.path.basename(source)}
    else:
        raise DataError(f"unknown calibration source {source!r}: use self, {', '.join(NAMED_SETS)}, "
                        "or a .txt/.jsonl/.parquet file")
    ids = tokenize(tokenizer, text)
    windows = random_windows(ids, nsamples, seqlen, seed)
    return CalibrationSet(windows, source if source in NAMED_SETS else "file", seed,
                          {**summary, "tokens_available": int(ids.numel())})


def evaluation_windows(name: str, tokenizer, count: int, seqlen: int = 512) -> torch.Tensor:
    """Held-out evaluation windows: wikitext2 (test rows) or c4 (docs[1000:2000]); or the selection windows,
    c4-select (random windows of the calibration documents docs[0:1000], seed SELECTION_SEED)."""
    if name == "wikitext2":
        text = wikitext2_test_text()
    elif name == "c4":
        text = "\n\n".join(c4_documents(*C4_HELDOUT_DOCS))
    elif name == SELECTION_SET:
        ids = tokenize(tokenizer, "\n\n".join(c4_documents(*C4_CALIBRATION_DOCS)))
        return random_windows(ids, count, seqlen, SELECTION_SEED)
    else:
        raise DataError(f"unknown evaluation set {name!r}; choose from {', '.join(EVAL_SETS)}")
    return consecutive_windows(tokenize(tokenizer, text), count, seqlen)

