"""The pipeline's stages on their own, without a model: the statistics plan, the resume directory, the
distributed exchange in one process, and the stage timer."""
import time

import pytest
import torch
from torch import nn

from lowrank_engine import distributed, pipeline, solvers, statistics, workdir


def _linears(**shapes):
    return {name: nn.Linear(n, m, bias=False) for name, (m, n) in shapes.items()}


@pytest.mark.parametrize("method, q_path, down_path", [
    ("svd", ("none", "plain"), ("none", "plain")),
    ("svd-llm", ("A", "output_side"), ("YtY", "output_gram")),
    ("aa-svd", ("ABC", "whitened"), ("anchored", "anchored_output")),
    ("saes", ("ABC", "whitened"), ("anchored", "whitened")),
    ("erc-svd", ("ABC", "whitened"), ("ABC", "whitened")),
    ("asvd", ("D", "diagonal"), ("D", "diagonal")),
    ("fwsvd", ("none", "diagonal"), ("none", "diagonal")),
])
def test_each_group_gets_one_path(method, q_path, down_path):
    """q/k/v (square and narrow outputs on a 12-wide input) and a down projection (5 outputs of a 20-wide
    input): what each collects and how it is solved, decided once."""
    linears = _linears(q=(12, 12), k=(4, 12), v=(4, 12), down=(5, 20))
    ranks = {"q": 3, "k": 2, "v": 2, "down": 2}
    plans = statistics.plan_groups(solvers.get_method(method), [["q", "k", "v"], ["down"]], linears, ranks)
    assert [(p.path.statistics, p.path.solve) for p in plans] == [q_path, down_path]
    assert plans[0].first == "q" and plans[0].shapes == {"q": (12, 12), "k": (4, 12), "v": (4, 12)}
    assert plans[1].ranks == {"down": 2}


def test_a_group_kept_dense_collects_nothing():
    linears = _linears(q=(12, 12), k=(4, 12))
    (plan,) = statistics.plan_groups(solvers.get_method("aa-svd"), [["q", "k"]], linears, {"q": None, "k": None})
    assert plan.compressed == [] and plan.path == solvers.GroupPath("none", "none")


def test_resume_dir_keeps_finished_blocks_and_refuses_another_run(tmp_path):
    resume = workdir.ResumeDir(str(tmp_path))
    fingerprint = {"settings": {"ratio": 0.4}, "calibration": "c", "model": "m", "processes": 1}
    assert resume.finished_blocks(fingerprint) == set()
    tensors = {"layers.3.a.U": torch.randn(5, 2), "layers.3.a.V": torch.randn(7, 2)}
    resume.write_block(3, tensors, {"layers.3.a": 2}, {"index": 3, "modules": {}})
    assert resume.finished_blocks(fingerprint) == {3}
    read, ranks, report = resume.read_block(3, "cpu")
    assert all(torch.equal(read[k], v) for k, v in tensors.items())
    assert ranks == {"layers.3.a": 2} and report["index"] == 3
    with pytest.raises(ValueError, match="ratio 0.4 → 0.6"):
        resume.finished_blocks({**fingerprint, "settings": {"ratio": 0.6}})


def test_the_distributed_exchange_is_a_no_op_in_one_process():
    assert not distributed.active() and distributed.owner(5) == 0
    factors = {"a": solvers.Factors(U=torch.randn(4, 2), V=torch.randn(3, 2), sigma=torch.ones(3), rank=2)}
    assert distributed.broadcast_factors(factors, {"a": (4, 3)}, torch.float64, "cpu", src=0) is factors
    stats = solvers.GroupStatistics(A=torch.ones(3, 3), D=torch.full((3,), 2.0), tokens=7)
    distributed.reduce_statistics(stats, "absmax")
    assert torch.equal(stats.A, torch.ones(3, 3)) and torch.equal(stats.D, torch.full((3,), 2.0)) and stats.tokens == 7


def test_stage_timer_adds_up_per_stage_and_per_block():
    timer = pipeline.StageTimer()
    for _ in range(2):
        with timer("solve"):
            time.sleep(0.01)
    block_total = timer.block["solve"]
    timer.block = {}
    with timer("write"):
        pass
    assert timer.total["solve"] >= 0.02 and block_total == pytest.approx(timer.total["solve"])
    assert set(timer.block) == {"write"} and set(timer.total) == {"solve", "write"}
    with pytest.raises(RuntimeError):  # a failing stage is still timed
        with timer("refine"):
            raise RuntimeError
    assert "refine" in timer.total
