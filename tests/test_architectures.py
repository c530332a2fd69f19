"""The architecture matrix: every model type we claim, on a tiny random float32 config with the feature
that matters switched on, checked against transformers' own forward."""
import logging
import os

import pytest
import torch

from lowrank_engine import architectures, checkpoint, models, pipeline
from lowrank_engine.models import UnsupportedArchitecture

MATRIX = sorted(architectures.TINY_CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type → a directory written by transformers' own save_pretrained (made once per module)."""
    root = tmp_path_factory.mktemp("matrix")
    made = {}

    def get(model_type):
        if model_type not in made:
            made[model_type] = architectures.saved_checkpoint(model_type, str(root / model_type))
        return made[model_type]
    return get


def test_the_matrix_is_exactly_the_supported_list():
    assert sorted(models.SUPPORTED_ARCHITECTURES) == MATRIX
    for model_type in MATRIX:
        assert architectures.TINY_CONFIGS[model_type]().model_type == model_type


@pytest.mark.parametrize("model_type", MATRIX)
def test_each_config_switches_its_feature_on(model_type):
    model = architectures.tiny_model(model_type)
    config = model.config
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or [])
    if model_type in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"):
        assert window is not None and window < architectures.SEQLEN  # the window cuts the test sequence
    if model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        assert types == {"sliding_attention", "full_attention"}  # blocks get different masks
    names = {n.split("layers.0.", 1)[1] for n, _ in model.named_parameters() if "layers.0." in n}
    assert config.num_key_value_heads < config.num_attention_heads  # GQA everywhere
    expected = {
        "qwen2": {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"},
        "qwen3": {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        "olmo2": {"self_attn.q_norm.weight", "self_attn.k_norm.weight", "post_feedforward_layernorm.weight"},
        "gemma2": {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"},
        "gemma3_text": {"self_attn.q_norm.weight", "pre_feedforward_layernorm.weight",
                        "post_feedforward_layernorm.weight", "post_attention_layernorm.weight"},
        "phi3": {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"},
    }.get(model_type, set())
    assert expected <= names
    if model_type == "gemma3_text":  # global layers use another RoPE base than sliding ones
        thetas = {t: p["rope_theta"] for t, p in config.rope_parameters.items()}
        assert thetas["full_attention"] != thetas["sliding_attention"]
    if model_type == "granite":
        assert config.residual_multiplier != 1 and config.attention_multiplier != 1


@pytest.mark.parametrize("model_type", MATRIX)
def test_dense_stream_matches_the_models_own_forward_at_every_block(model_type, saved):
    directory = saved(model_type)
    ids = architectures.calibration_ids(architectures.tiny_model(model_type), seed=11)
    errors = architectures.stream_divergence(directory, ids)
    assert len(errors) == architectures.TINY_CONFIGS[model_type]().num_hidden_layers
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_block_0_arguments_would_be_wrong_for_later_blocks(model_type, saved):
    """The matrix can fail: replaying block 0's arguments to every block (the old behaviour) diverges
    from the model on these configs, whose blocks get different masks (and rotary tables)."""
    ids = architectures.calibration_ids(architectures.tiny_model(model_type), seed=3)
    errors = architectures.stream_divergence(saved(model_type), ids, block_0_arguments=True)
    assert max(errors) > 1e-3, errors


def test_arguments_shared_between_blocks_are_stored_once():
    model = architectures.tiny_model("gemma3_text")
    hidden = []
    kwargs = pipeline.capture_block_inputs(model, model.model.layers, architectures.calibration_ids(model), 2, "cpu",
                                           hidden)
    types = model.config.layer_types
    assert len(kwargs) == len(types) and all(len(k) == 2 for k in kwargs)
    for batch in range(2):
        for i in range(len(types)):
            for j in range(len(types)):
                a, b = kwargs[i][batch], kwargs[j][batch]
                same_type = types[i] == types[j]
                assert (a["attention_mask"] is b["attention_mask"]) == same_type
                assert (a["position_embeddings"][0] is b["position_embeddings"][0]) == same_type
                assert a["position_ids"] is b["position_ids"]


@pytest.mark.parametrize("model_type", MATRIX)
def test_reported_block_errors_equal_transformers_forward_of_the_saved_checkpoint(model_type, saved):
    directory = saved(model_type)
    ids = architectures.calibration_ids(architectures.tiny_model(model_type), seed=5)
    result = architectures.block_error_mismatch(directory, ids, method="svd-llm", ratio=0.4)
    assert min(result["measured"]) > 1e-3  # compression did change every block
    assert result["max_mismatch"] < 1e-4, result


@pytest.mark.parametrize("model_type", MATRIX)
def test_every_method_compresses_and_roundtrips_bit_identically(model_type):
    runs = architectures.methods_roundtrip(model_type)
    assert all(r["ok"] for r in runs.values()), runs
    assert all(r["roundtrip"] for r in runs.values()), runs


def test_untested_model_type_runs_with_one_warning(caplog):
    from transformers import AutoModelForCausalLM, Cohere2Config

    config = Cohere2Config(**{**architectures.TINY_DEFAULTS, "sliding_window": 8,
                              "layer_types": ["sliding_attention", "full_attention"], "num_hidden_layers": 2})
    ids = architectures.calibration_ids(AutoModelForCausalLM.from_config(config))
    models._warned_untested.discard("cohere2")
    with caplog.at_level(logging.WARNING, logger="lowrank_engine"):
        for _ in range(2):
            result = pipeline.compress_model(AutoModelForCausalLM.from_config(config).eval(), ids,
                                             pipeline.CompressionConfig(method="svd-llm", ratio=0.4), progress=False)
            assert len(result.blocks) == 2
    warnings = [r for r in caplog.records if "untested" in r.getMessage()]
    assert len(warnings) == 1 and "cohere2" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_model_without_linear_blocks_gets_a_clear_error():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))  # Conv1D
    with pytest.raises(UnsupportedArchitecture, match="no decoder blocks found in 'gpt2'.*nn.Linear"):
        pipeline.compress_model(model, torch.zeros(1, 8, dtype=torch.long),
                                pipeline.CompressionConfig(method="svd-llm", ratio=0.4), progress=False)


# --------------------------------------------------------------------------------------
# checkpoint names: what transformers renames or fuses at load time
# --------------------------------------------------------------------------------------
def _tiny_multimodal_gemma3():
    from transformers import AutoModelForCausalLM, Gemma3Config

    config = Gemma3Config(text_config=architectures.TINY_CONFIGS["gemma3_text"]().to_dict(),
                          vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=28, patch_size=14),
                          mm_tokens_per_image=4)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_multimodal_gemma3_checkpoint_is_renamed_as_transformers_does(tmp_path):
    """save_pretrained writes the legacy names (`language_model.model.layers.…`); the lazy loader maps them
    to the model's, and the streamed dense stream matches the model's own forward."""
    model = _tiny_multimodal_gemma3()
    model.save_pretrained(tmp_path / "g3")
    source = pipeline.LazyBlockSource(str(tmp_path / "g3"))
    assert source.blocks_name == "model.language_model.layers"
    assert any(stored.startswith("language_model.model.") for stored in source.stored.values())
    ids = architectures.calibration_ids(model)
    assert max(architectures.stream_divergence(str(tmp_path / "g3"), ids)) < 1e-5


def test_fused_expert_checkpoint_is_refused_up_front_naming_the_keys(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig

    model = AutoModelForCausalLM.from_config(MixtralConfig(**architectures.TINY_DEFAULTS, num_local_experts=3,
                                                           num_experts_per_tok=2))
    model.save_pretrained(tmp_path / "moe")  # per-expert w1/w2/w3, which transformers fuses when loading
    with pytest.raises(checkpoint.CheckpointError, match=r"fuses or splits .*experts\.\d+\.w\d\.weight"):
        pipeline.LazyBlockSource(str(tmp_path / "moe"))


def test_a_missing_block_tensor_is_reported_before_any_work(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = architectures.saved_checkpoint("llama", str(tmp_path / "llama"))
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(checkpoint.CheckpointError, match=r"lacks 1 tensors .*layers\.3\.mlp\.down_proj"):
        pipeline.LazyBlockSource(directory)


def test_fused_projections_are_one_group_with_one_rank():
    """Phi-3's qkv_proj and gate_up_proj are single linears: each is its own group and gets one rank from
    its full shape (q, k and v share it), not three ranks or a rank per slice."""
    from lowrank_engine import solvers
    from lowrank_engine.models import block_linears

    model = architectures.tiny_model("phi3")
    ids = architectures.calibration_ids(model)
    hidden = []
    kwargs = pipeline.capture_block_inputs(model, model.model.layers, ids, 2, "cpu", hidden)
    groups = pipeline.discover_groups(model.model.layers[0], hidden[0], kwargs[0][0], "cpu")
    assert groups == [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]
    shapes = {n: tuple(m.weight.shape) for n, m in block_linears(model.model.layers[0]).items()}
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert shapes["self_attn.qkv_proj"] == ((config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim,
                                            config.hidden_size)
    result = pipeline.compress_model(model, ids, pipeline.CompressionConfig(method="svd-llm", ratio=0.4),
                                     progress=False)
    for name, (m, n) in shapes.items():
        assert result.ranks[f"model.layers.0.{name}"] == solvers.rank_for_ratio(m, n, 0.4)


def test_capturing_every_blocks_arguments_reads_no_block_weight(saved):
    """The streaming promise: block arguments are recorded with every block still on `meta`."""
    source = pipeline.LazyBlockSource(saved("gemma3_text"))
    assert all(p.is_meta for block in source.blocks for p in block.parameters())
    hidden = []
    kwargs = pipeline.capture_block_inputs(source.model, source.blocks, architectures.calibration_ids(source.model),
                                           2, "cpu", hidden)
    assert all(p.is_meta for block in source.blocks for p in block.parameters())
    assert len(kwargs) == len(source.blocks) and len(hidden) == 2
    assert not any(isinstance(v, torch.Tensor) and v.is_meta for kw in kwargs for b in kw for v in b.values())
