import importlib.util
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def load_floor():
    spec = importlib.util.spec_from_file_location("floor", os.path.join(HERE, "..", "benchmarks", "floor.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["floor"] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_block_shapes_and_groups_found_from_the_config():
    floor = load_floor()
    config = floor.tiny_config()
    depth, linears, groups = floor.block_shapes(config)
    assert depth == 2
    assert linears == {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
                       "self_attn.o_proj": (64, 64), "mlp.gate_proj": (160, 64), "mlp.up_proj": (160, 64),
                       "mlp.down_proj": (64, 160)}
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_quick_run_adds_the_products_it_timed(tmp_path):
    floor = load_floor()
    runs = tmp_path / "runs"
    runs.mkdir()
    out = tmp_path / "out"
    assert floor.main(["--quick", "--out-dir", str(out), "--runs-dir", str(runs)]) == 0
    record = json.loads((out / "floor.json").read_text())
    assert "| svd-llm |" in (out / "floor.md").read_text()
    products = {p["name"]: p for p in record["products"]}
    assert all(p["ms"] > 0 and p["flop"] > 0 for p in products.values())
    tokens = record["batch_size"] * record["seqlen"]
    weights = 64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3
    assert products["dense linears"]["flop"] == 2 * tokens * weights
    cross = "C: XᵀX', or W·C = YᵀX' (down_proj)"
    assert products[cross]["flop"] == 2 * tokens * (3 * 64 * 64 + 64 * 160)  # down_proj: W·C is 64×160
    scale = record["blocks"] * record["nsamples"] // record["batch_size"] / 1e3
    seconds = {name: p["ms"] * scale for name, p in products.items()}
    got = {f["method"]: f["floor_seconds"] for f in record["floors"]}
    dense = seconds["dense linears"] + seconds["attention (SDPA, causal)"]
    single = "svd-llm: XᵀX or outputs' YᵀY, half a GEMM"
    assert products[single]["flop"] == tokens * (3 * 64 * 64 + 64 * 64)  # down_proj: its 64-wide output, not 160
    assert got["svd-llm"] == pytest.approx(dense + seconds[single])
    factorized = seconds["factorized linears"] + seconds["attention (SDPA, causal)"]
    aa_svd = dense + factorized + seconds["A or B: XᵀX at half a GEMM"] + seconds[cross]
    assert got["aa-svd"] == pytest.approx(aa_svd)
    refine_pass = seconds["refine: factorized linears fwd+bwd"] + seconds["refine: attention fwd+bwd"]
    assert got["aa-svd+refine (3 passes)"] == pytest.approx(aa_svd + 3 * refine_pass + factorized)
    assert all(f["engine_seconds"] is None and f["peer_seconds"] is None and f["peer_seconds_this_machine"] is None
               for f in record["floors"])


def test_peer_seconds_of_this_machine_come_from_its_own_runs(tmp_path):
    floor = load_floor()
    from lowrank_engine import report

    runs = tmp_path / "runs"
    runs.mkdir()
    here, elsewhere = report.device_name("cpu"), "cpu (2 cores, Other CPU)"
    peer_runs = [{"protocol": "tiny-random-llama", "device": here, "method": "svd-llm", "ratio": 0.4,
                  "refine_passes": None, "compress_seconds": 7.5},
                 {"protocol": "tiny-random-llama", "device": elsewhere, "method": "aa-svd", "ratio": 0.4,
                  "refine_passes": None, "compress_seconds": 9.0},
                 {"protocol": "tiny-random-llama", "device": here, "method": "aa-svd+refine", "ratio": 0.4,
                  "refine_passes": 25, "compress_seconds": 99.0}]  # not the 3 passes floor.py counts
    (tmp_path / "peer_runs.json").write_text(json.dumps(peer_runs))
    out = tmp_path / "out"
    assert floor.main(["--quick", "--out-dir", str(out), "--runs-dir", str(runs),
                       "--peer-runs-file", str(tmp_path / "peer_runs.json")]) == 0
    got = {f["method"]: f["peer_seconds_this_machine"] for f in json.loads((out / "floor.json").read_text())["floors"]}
    assert got == {"svd-llm": 7.5, "aa-svd": None, "aa-svd+refine (3 passes)": None}
    assert "| 7.5 |" in (out / "floor.md").read_text()
    quality = sys.modules["quality"]  # floor.py imports it from benchmarks/
    (tmp_path / "bad.json").write_text(json.dumps({"method": "svd-llm"}))
    with pytest.raises(ValueError, match="list of records"):
        quality.load_peer_runs(str(tmp_path / "bad.json"))
    assert quality.load_peer_runs(str(tmp_path / "missing.json")) == []


def test_engine_seconds_read_from_matching_record_only(tmp_path):
    floor = load_floor()
    rows = [("aa-svd+refine", 0.4, 3, 886.7, "cpu (2 cores)"), ("aa-svd+refine", 0.4, 25, 4325.0, "cpu (2 cores)"),
            ("svd-llm", 0.6, None, 109.4, "cpu (2 cores)"), ("svd-llm", 0.4, None, 12.5, "NVIDIA H100")]
    for i, (method, ratio, passes, seconds, device) in enumerate(rows):
        (tmp_path / f"r{i}.json").write_text(json.dumps({"protocol": "p", "method": method, "ratio": ratio,
                                                         "refine_passes": passes, "compress_seconds": seconds,
                                                         "device": device}))
    (tmp_path / "quality.json").write_text(json.dumps([{"method": "svd-llm"}]))  # the table, when --out-dir is here too
    cpu = "cpu (2 cores)"
    assert floor.engine_seconds(str(tmp_path), "p", cpu, "aa-svd+refine", 0.4, 25) == 4325.0
    assert floor.engine_seconds(str(tmp_path), "p", cpu, "aa-svd+refine", 0.4, 3) == 886.7
    assert floor.engine_seconds(str(tmp_path), "p", cpu, "svd-llm", 0.4, 3) is None  # only a GPU record
    assert floor.engine_seconds(str(tmp_path), "p", "NVIDIA H100", "svd-llm", 0.4, 3) == 12.5
    assert floor.engine_seconds(str(tmp_path), "other", cpu, "svd-llm", 0.6, 3) is None


@pytest.mark.parametrize("argv", [["--nsamples", "5", "--batch-size", "2"], ["--ratio", "1.2"],
                                  ["--refine-passes", "-1"]])
def test_bad_arguments_fail_before_writing(tmp_path, argv):
    floor = load_floor()
    with pytest.raises(SystemExit) as exc:
        floor.main(argv + ["--out-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


def test_engine_seconds_leave_out_the_error_report(tmp_path):
    """quality.py's records count the error report in compress_seconds; the floor has none."""
    floor = load_floor()
    base = {"protocol": "p", "device": "cpu", "method": "svd-llm", "ratio": 0.4, "refine_passes": None}
    (tmp_path / "new.json").write_text(json.dumps({**base, "compress_seconds": 80.0, "track_error": True,
                                                   "stage_seconds": {"statistics": 40.0, "error_tracking": 30.0}}))
    assert floor.engine_seconds(str(tmp_path), "p", "cpu", "svd-llm", 0.4, 3) == 50.0
    (tmp_path / "new.json").write_text(json.dumps({**base, "compress_seconds": 80.0, "track_error": False,
                                                   "stage_seconds": {"statistics": 40.0}}))
    assert floor.engine_seconds(str(tmp_path), "p", "cpu", "svd-llm", 0.4, 3) == 80.0
