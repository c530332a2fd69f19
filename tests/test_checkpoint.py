"""save / load: bit-identical round trips, atomic writes, clear errors on corrupt input."""
import json
import os

import pytest
import torch

from lowrank_engine import checkpoint, pipeline
from lowrank_engine.modules import LowRankLinear

from conftest import tiny_model


def _compressed(kind="llama", method="svd-llm"):
    model = tiny_model(kind)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    pipeline.compress_model(model, ids, pipeline.CompressionConfig(method=method, ratio=0.4), progress=False)
    return model, ids


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_round_trip_is_bit_identical(tmp_path, kind):
    model, ids = _compressed(kind)
    out = tmp_path / "ckpt"
    checkpoint.save(model, str(out), method="svd-llm", ratio=0.4, calibration={"source": "test", "nsamples": 4})
    loaded, cfg = checkpoint.load(str(out))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert cfg["method"] == "svd-llm" and cfg["ratio"] == 0.4 and cfg["quant_method"] == "lowrank"
    assert cfg["modules_to_not_convert"] == ["lm_head"]
    assert cfg["engine_version"] and cfg["calibration"]["nsamples"] == 4
    assert cfg["ranks"]["model.layers.0.self_attn.q_proj"] == loaded.model.layers[0].self_attn.q_proj.rank
    assert isinstance(loaded.model.layers[1].mlp.down_proj, LowRankLinear)
    assert not [f for f in os.listdir(tmp_path) if f != "ckpt"]  # no temporary leftovers


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    checkpoint.save(model, str(tmp_path / "c"), method="none")
    loaded, _ = checkpoint.load(str(tmp_path / "c"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_existing_output_is_refused(tmp_path):
    model, _ = _compressed()
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        checkpoint.save(model, str(tmp_path / "ckpt"))


def test_crash_during_save_leaves_nothing(tmp_path, monkeypatch):
    model, _ = _compressed()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_checksums", boom)  # the last step
    with pytest.raises(OSError):
        checkpoint.save(model, str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == []


def test_truncated_tensor_file_is_reported(tmp_path):
    model, _ = _compressed()
    out = tmp_path / "ckpt"
    checkpoint.save(model, str(out))
    path = out / checkpoint.SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(str(out))


def test_incomplete_or_foreign_directories_are_reported(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete"):
        checkpoint.load(str(tmp_path / "empty"))
    model, _ = _compressed()
    out = tmp_path / "ckpt"
    checkpoint.save(model, str(out))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["ranks"]["model.layers.0.self_attn.q_proj"] += 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises((checkpoint.CheckpointError, RuntimeError), match="size|shape|q_proj"):
        checkpoint.load(str(out))
    config["quantization_config"]["format_version"] = checkpoint.FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="format version"):
        checkpoint.load(str(out))
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="no quantization_config"):
        checkpoint.load(str(out))
    (out / checkpoint.LEGACY_CONFIG).write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="format-1"):
        checkpoint.load(str(out))


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _compressed()
    out = tmp_path / "ckpt"
    checkpoint.save(model, str(out))
    tensors = load_file(str(out / checkpoint.SINGLE_FILE))
    tensors.pop("model.layers.1.mlp.up_proj.U")
    save_file(tensors, str(out / checkpoint.SINGLE_FILE))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        checkpoint.load(str(out))
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.load(str(out), verify=False)


def test_lowrank_linear_matches_dense_product():
    U, V, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    layer = LowRankLinear.from_factors(U, V, b)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (U @ V.T).T + b)
    torch.testing.assert_close(layer.dense_weight(), U @ V.T)


def test_lowrank_linear_gradients_match_dense():
    U, V = torch.randn(6, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    layer = LowRankLinear.from_factors(U, V, b)
    torch.autograd.gradcheck(lambda x, V, U, b: torch.ops.lowrank_engine.lowrank_linear(x, V, U, b),
                             (x, layer.V.detach().requires_grad_(), layer.U.detach().requires_grad_(),
                              b.clone().requires_grad_()))
