"""Rank allocation: the global budget is met, and rank goes where the truncation loss falls fastest."""
import itertools

import pytest
import torch

from conftest import tiny_model
from lowrank_engine import allocation, pipeline, solvers
from lowrank_engine.models import block_linears, find_decoder_blocks
from lowrank_engine.modules import LowRankLinear


def _spectrum(n, decay):
    return torch.tensor([decay ** i for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_waterfill_meets_the_budget_and_favours_slow_decay(ratio):
    shapes = {"flat": (40, 56), "steep": (40, 56), "wide": (24, 96), "odd": (37, 29)}
    spectra = {"flat": _spectrum(40, 0.97), "steep": _spectrum(40, 0.6), "wide": _spectrum(24, 0.9),
               "odd": _spectrum(29, 0.85)}
    ranks = allocation.waterfill(spectra, shapes, ratio)
    budget = allocation.kept_budget(shapes, ratio)
    kept = allocation.kept_parameters(ranks, shapes)
    assert kept <= budget and budget - kept < max(m + n for m, n in shapes.values())  # within one rank unit
    assert ranks["flat"] > ranks["steep"]
    for name, (m, n) in shapes.items():
        assert 1 <= ranks[name] and ranks[name] * (m + n) < m * n


def test_waterfill_is_optimal_against_single_unit_moves():
    shapes = {"a": (30, 30), "b": (30, 30), "c": (30, 30)}
    spectra = {"a": _spectrum(30, 0.9), "b": _spectrum(30, 0.8), "c": _spectrum(30, 0.7)}
    ranks = allocation.waterfill(spectra, shapes, 0.5)

    def loss(r):
        return sum(float((spectra[k][r[k]:] ** 2).sum() / (spectra[k] ** 2).sum()) for k in r)

    best = loss(ranks)
    for src in ranks:
        for dst in ranks:
            if src != dst and ranks[src] > 1:
                moved = dict(ranks, **{src: ranks[src] - 1, dst: ranks[dst] + 1})
                assert loss(moved) >= best - 1e-12


def test_grouped_waterfill_shares_one_rank_and_is_optimal_between_groups():
    shapes = {f"b{i}.{t}": shape for i in range(3) for t, shape in (("q", (30, 30)), ("v", (12, 48)), ("up", (45, 15)))}
    generator = torch.Generator().manual_seed(3)
    spectra = {name: torch.sort(torch.rand(min(shape), generator=generator, dtype=torch.float64) ** (4 if ".q" in name else 1),
                                descending=True).values for name, shape in shapes.items()}
    groups = {name: name.split(".")[1] for name in shapes}
    ranks = allocation.waterfill(spectra, shapes, 0.5, groups=groups)
    shared = {t: {ranks[name] for name in shapes if groups[name] == t} for t in ("q", "v", "up")}
    assert all(len(r) == 1 for r in shared.values())
    budget = allocation.kept_budget(shapes, 0.5)
    cost = {t: sum(m + n for name, (m, n) in shapes.items() if groups[name] == t) for t in shared}
    assert allocation.kept_parameters(ranks, shapes) <= budget
    assert budget - allocation.kept_parameters(ranks, shapes) < max(cost.values())  # within one unit of a group

    def loss(type_ranks):
        return sum(float((spectra[name][type_ranks[groups[name]]:] ** 2).sum() / (spectra[name] ** 2).sum())
                   for name in shapes)

    chosen = {t: r.pop() for t, r in shared.items()}
    for src in chosen:  # equal unit costs (m+n = 60 in every group), so greedy is exact: no rank unit moved from one type to another (within the budget) lowers the loss
        for dst in chosen:
            moved = dict(chosen, **{src: chosen[src] - 1, dst: chosen[dst] + 1})
            fits = sum(moved[t] * cost[t] for t in cost) <= budget
            if src != dst and chosen[src] > 1 and fits:
                assert loss(moved) >= loss(chosen) - 1e-12


def test_dense_types_are_chosen_where_they_lose_least_and_match_brute_force():
    """allow_dense: every type either shares one rank or stays dense everywhere, the budget is met, and the
    normalized loss equals the best over every dense subset and every rank vector (equal unit costs m+n = 60,
    so the greedy fill is exact)."""
    types = {"q": (30, 30), "v": (12, 48), "up": (45, 15)}
    shapes = {f"b{i}.{t}": shape for i in range(2) for t, shape in types.items()}
    groups = {name: name.split(".")[1] for name in shapes}
    generator = torch.Generator().manual_seed(5)
    # v's spectrum is flat: its factors at break-even still lose most of it, so storing it whole pays
    spectra = {name: torch.sort(torch.rand(min(shape), generator=generator, dtype=torch.float64)
                                ** (0.1 if ".v" in name else 6), descending=True).values
               for name, shape in shapes.items()}
    for ratio in (0.15, 0.3):
        ranks = allocation.waterfill(spectra, shapes, ratio, groups=groups, allow_dense=True)
        budget = allocation.kept_budget(shapes, ratio)
        assert allocation.kept_parameters(ranks, shapes) <= budget
        chosen = {}
        for name, rank in ranks.items():
            chosen.setdefault(groups[name], set()).add(rank)
        assert all(len(r) == 1 for r in chosen.values())
        chosen = {t: r.pop() for t, r in chosen.items()}

        def loss(type_ranks):
            return sum(0.0 if type_ranks[groups[name]] is None else
                       float((spectra[name][type_ranks[groups[name]]:] ** 2).sum() / (spectra[name] ** 2).sum())
                       for name in shapes)

        options = {t: [None] + list(range(1, solvers.break_even_rank(*shape))) for t, shape in types.items()}
        best = min(loss(candidate) for candidate in (dict(zip(types, combo)) for combo in
                                                     itertools.product(*options.values()))
                   if allocation.kept_parameters({n: candidate[groups[n]] for n in shapes}, shapes) <= budget)
        assert loss(chosen) == pytest.approx(best, abs=1e-12)
        assert chosen["v"] is None  # the case the option exists for
        plain = allocation.waterfill(spectra, shapes, ratio, groups=groups)
        assert None not in plain.values() and loss({groups[n]: r for n, r in plain.items()}) > loss(chosen)


def test_last_layers_keeps_the_first_blocks_dense_and_meets_the_ratio():
    model = tiny_model("llama", layers=4)
    name, blocks = find_decoder_blocks(model)
    block_shapes = [{f"{name}.{i}.{n}": (m.out_features, m.in_features) for n, m in block_linears(b).items()}
                    for i, b in enumerate(blocks)]
    shapes = {k: v for b in block_shapes for k, v in b.items()}
    ranks = allocation.last_layers(block_shapes, 0.2, k=2)
    assert all(ranks[n] is None for n in block_shapes[0]) and all(ranks[n] for n in block_shapes[3])
    removed = 1 - allocation.kept_parameters(ranks, shapes) / sum(m * n for m, n in shapes.values())
    assert removed == pytest.approx(0.2, abs=0.03)
    with pytest.raises(ValueError, match="larger k"):
        allocation.last_layers(block_shapes, 0.6, k=1)

    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    pipeline.compress_model(model, ids, pipeline.CompressionConfig(method="aa-svd", ratio=None, rank_map=ranks),
                            progress=False)
    assert all(not isinstance(m, LowRankLinear) for m in block_linears(blocks[0]).values())
    assert all(isinstance(m, LowRankLinear) for m in block_linears(blocks[3]).values())


def test_feasible_last_layers_spread_from_the_smallest_k_to_every_block():
    block_shapes = [{f"b{i}.w": (8, 8)} for i in range(10)]
    assert allocation.feasible_last_layers(block_shapes, 0.25, count=4) == [3, 5, 8, 10]  # 2 blocks cannot remove 25%
    assert allocation.feasible_last_layers(block_shapes, 0.95, count=3) == [10]
    assert allocation.feasible_last_layers(block_shapes, 0.25, count=1) == [10]


def test_last_layers_search_keeps_the_k_with_the_smallest_calibration_error(tmp_path):
    model = tiny_model("llama", layers=4, seed=2)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(1))
    k, errors = allocation.search_last_layers(str(tmp_path / "m"), ids, 0.3, "svd-llm", windows=4, progress=False,
                                              batch_size=2)
    assert sorted(errors) == allocation.feasible_last_layers(
        allocation.model_shapes(pipeline.LazyBlockSource(str(tmp_path / "m"))), 0.3)
    assert k == min(errors, key=errors.get) and all(e > 0 for e in errors.values())
    # each error is the one a direct run with that k reports
    some = max(errors)
    direct = pipeline.LazyBlockSource(str(tmp_path / "m"))
    ranks = allocation.last_layers(allocation.model_shapes(direct), 0.3, some)
    result = pipeline.Compressor(direct, pipeline.CompressionConfig(method="svd-llm", ratio=None, rank_map=ranks,
                                                                    batch_size=2), progress=False).run(ids[:4])
    assert result.blocks[-1].output_rel_mse == pytest.approx(errors[some], rel=1e-5)
