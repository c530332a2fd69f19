"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on the in-memory model.

No scorer of our own: lm-eval's HF wrapper (HFLM) scores the model object, and its stock task definitions
(the YAML shipped inside the installed lm-eval package) give the prompt, the choices and the metric. With
$LOWRANK_ENGINE_DATA set, only the data source changes: each row of `zeroshot/<file>.jsonl` (llm-foundry's
`query`/`choices`/`gold` or `context`/`continuation`) is mapped to the stock task's document schema and
served as the split the stock task evaluates. Without it, the stock hub tasks are used as they are.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Optional

from lowrank_engine import data

ANSWER_LABELS = "ABCDEFGHIJ"


class ZeroShotError(ValueError):
    """An unknown task, or a local data file that does not fit the stock task's schema."""


def _strip_question(query: str) -> str:
    if not query.startswith("Question: "):
        raise ZeroShotError(f"expected a query starting with 'Question: ', got {query[:40]!r}")
    return query[len("Question: "):]


def _choices(row: dict) -> dict:
    return {"text": list(row["choices"]), "label": list(ANSWER_LABELS[:len(row["choices"])])}


def arc_doc(row: dict) -> dict:
    """llm-foundry 'Question: q' / choices / gold → allenai/ai2_arc's question / choices / answerKey."""
    choices = _choices(row)
    return {"question": _strip_question(row["query"]), "choices": choices, "answerKey": choices["label"][row["gold"]]}


def piqa_doc(row: dict) -> dict:
    """llm-foundry 'Question: goal\\n' / [sol1, sol2] / gold → piqa's goal / sol1 / sol2 / label."""
    goal = _strip_question(row["query"])
    goal = goal[:-1] if goal.endswith("\n") else goal
    sol1, sol2 = row["choices"]
    return {"goal": goal, "sol1": sol1, "sol2": sol2, "label": int(row["gold"])}


def openbookqa_doc(row: dict) -> dict:
    """llm-foundry stem / choices / gold → allenai/openbookqa's question_stem / choices / answerKey."""
    choices = _choices(row)
    return {"question_stem": row["query"], "choices": choices, "answerKey": choices["label"][row["gold"]]}


def lambada_doc(row: dict) -> dict:
    """llm-foundry split the passage at its last space; joining at one space gives lambada_openai's text back."""
    if " " in row["continuation"]:
        raise ZeroShotError(f"a LAMBADA continuation holds a space: {row['continuation']!r}")
    return {"text": row["context"] + " " + row["continuation"]}


# task name (lm-eval's) → (local file under $LOWRANK_ENGINE_DATA/zeroshot, row → stock document)
LOCAL_TASKS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "arc_easy": ("arc_easy.jsonl", arc_doc),
    "arc_challenge": ("arc_challenge.jsonl", arc_doc),
    "piqa": ("piqa.jsonl", piqa_doc),
    "openbookqa": ("openbook_qa.jsonl", openbookqa_doc),
    "lambada_openai": ("lambada_openai.jsonl", lambada_doc),
}
METRICS = ("acc", "acc_norm")


def parse_tasks(value: str) -> list[str]:
    names = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in names if t not in LOCAL_TASKS]
    if unknown:
        raise ZeroShotError(f"unknown zero-shot task(s) {', '.join(unknown)}; choose from {', '.join(LOCAL_TASKS)}")
    return names


@functools.lru_cache(maxsize=1)
def _stock_index() -> dict:
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index  # indexing every shipped YAML takes seconds: once per process


def stock_config(name: str) -> dict:
    """The stock task's config, read from the YAML inside the installed lm-eval package (includes resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _stock_index().get(name)
    if entry is None or entry.yaml_path is None:
        raise ZeroShotError(f"the installed lm-eval has no YAML task {name}")
    cfg = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group"):  # index structure, not task settings (lm-eval's factory drops them too)
        cfg.pop(key, None)
    return cfg


def eval_split(cfg: dict) -> str:
    """The split lm-eval scores for a task: test when the task has one, else validation."""
    return cfg.get("test_split") or cfg["validation_split"]


def read_local_docs(name: str, data_dir: str) -> list[dict]:
    file, to_doc = LOCAL_TASKS[name]
    path = os.path.join(data_dir, "zeroshot", file)
    if not os.path.exists(path):
        raise ZeroShotError(f"{path} does not exist (the zero-shot data of {name})")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    try:
        return [to_doc(row) for row in rows]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ZeroShotError(f"{path} does not fit the {name} schema: {exc}") from exc


def local_task(name: str, data_dir: str):
    """The stock lm-eval task `name` with its evaluated split served from the local jsonl; nothing else changes."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    cfg = stock_config(name)
    split = eval_split(cfg)
    docs = read_local_docs(name, data_dir)
    cfg.update(
        dataset_path=os.path.join(data_dir, "zeroshot", LOCAL_TASKS[name][0]), dataset_name=None,
        custom_dataset=lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(docs)}),
        # zero-shot: the local file holds only the scored split
        training_split=None, fewshot_split=None,
        validation_split=split if split == cfg.get("validation_split") else None,
        test_split=split if split == cfg.get("test_split") else None,
    )
    return ConfigurableTask(config=cfg)


def build_tasks(names: list[str], data_dir: Optional[str] = None) -> list:
    """Local tasks when a data directory is given (or $LOWRANK_ENGINE_DATA is set), else stock task names."""
    data_dir = data_dir or data.data_dir()
    if data_dir:
        return [local_task(name, data_dir) for name in names]
    return list(names)


def evaluate(model, tokenizer, names: list[str], limit: Optional[int] = None, batch_size: int = 16,
             data_dir: Optional[str] = None) -> dict[str, dict]:
    """{task: {"acc", "acc_norm", "n"}}; a metric the task does not define is None (lambada has no acc_norm)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=build_tasks(names, data_dir), limit=limit, bootstrap_iters=0,
                                  log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    scores = {}
    for name in names:
        result = out["results"][name]
        scores[name] = {metric: result.get(f"{metric},none") for metric in METRICS}
        scores[name]["n"] = int(out["n-samples"][name]["effective"])
    return scores


def flatten(scores: dict[str, dict]) -> dict:
    """One record's columns: <task>_acc, <task>_acc_norm, <task>_n."""
    return {f"{task}_{key}": value for task, row in scores.items() for key, value in row.items()}
