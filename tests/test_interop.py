"""Checkpoints the ecosystem loads, trusts and scores: transformers' from_pretrained / save_pretrained, verified
loads, the dense export, generation, and zero-shot tasks through lm-eval (issue 21)."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from lowrank_engine import checkpoint, cli, pipeline, zeroshot
from lowrank_engine.modules import LowRankLinear

from conftest import tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _saved(tmp_path, kind="llama", name="ckpt", seed=0):
    model = tiny_model(kind, seed=seed)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(seed + 1))
    pipeline.compress_model(model, ids, pipeline.CompressionConfig(method="svd-llm", ratio=0.4), progress=False)
    out = tmp_path / name
    checkpoint.save(model, str(out), method="svd-llm", ratio=0.4, tokenizer=tiny_tokenizer())
    return model, out, torch.randint(0, 96, (3, 12))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


# --------------------------------------------------------------------------------------
# transformers-native loading
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v carry biases
def test_from_pretrained_and_thin_load_agree_bit_for_bit(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model, out, ids = _saved(tmp_path, kind)
    hf = AutoModelForCausalLM.from_pretrained(out)
    thin, qcfg = checkpoint.load(str(out))
    assert isinstance(hf.model.layers[1].mlp.down_proj, LowRankLinear)
    assert hf.model.layers[1].mlp.down_proj.rank == qcfg["ranks"]["model.layers.1.mlp.down_proj"]
    assert torch.equal(_logits(hf, ids), _logits(thin, ids))
    assert torch.equal(_logits(hf, ids), _logits(model, ids))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowrank" and config["format_version"] == checkpoint.FORMAT_VERSION
    assert config["modules_to_not_convert"] == ["lm_head"] and len(config["ranks"]) == 14


def test_from_pretrained_takes_dtype_and_device_map(tmp_path):
    from transformers import AutoModelForCausalLM

    model, out, ids = _saved(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu")
    layer = hf.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LowRankLinear) and layer.U.dtype == torch.bfloat16 and layer.V.device.type == "cpu"
    assert torch.equal(layer.U, model.model.layers[0].self_attn.q_proj.U.to(torch.bfloat16))


def test_save_pretrained_gives_a_checkpoint_that_loads_the_same_way(tmp_path):
    from transformers import AutoModelForCausalLM

    model, out, ids = _saved(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(tmp_path / "again")
    thin, _ = checkpoint.load(str(out))
    thin.save_pretrained(tmp_path / "from-thin")
    for directory in ("again", "from-thin"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / directory)
        assert isinstance(reloaded.model.layers[0].mlp.up_proj, LowRankLinear)
        assert torch.equal(_logits(reloaded, ids), _logits(hf, ids))
        assert (json.loads((tmp_path / directory / "config.json").read_text())["quantization_config"]
                == json.loads((out / "config.json").read_text())["quantization_config"])
    # no SHA256SUMS from save_pretrained: the thin path warns and still loads, finite-checked
    again, _ = checkpoint.load(str(tmp_path / "again"))
    assert torch.equal(_logits(again, ids), _logits(hf, ids))


def test_importing_lowrank_engine_registers_the_quantizer_without_importing_transformers(tmp_path):
    _, out, _ = _saved(tmp_path)
    result = _run_python(
        "import sys, lowrank_engine\n"
        "assert 'transformers' not in sys.modules, 'import lowrank_engine imported transformers'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m.model.layers[0].self_attn.o_proj).__name__)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "LowRankLinear"
    late = _run_python("import transformers.quantizers.auto as auto\n"  # transformers first: registered at once
                       "import lowrank_engine\n"
                       "print('lowrank' in auto.AUTO_QUANTIZER_MAPPING, 'lowrank' in auto.AUTO_QUANTIZATION_CONFIG_MAPPING)\n")
    assert late.returncode == 0 and late.stdout.split() == ["True", "True"], late.stderr


def test_without_the_package_transformers_says_it_skips_the_quantization(tmp_path):
    """What a user without lowrank-engine sees (the README quotes it)."""
    _, out, _ = _saved(tmp_path)
    result = _run_python("from transformers import AutoModelForCausalLM\n"
                         f"AutoModelForCausalLM.from_pretrained({str(out)!r})\n")
    assert "Unknown quantization type, got lowrank" in result.stderr
    assert "MISSING" in result.stderr or "newly initialized" in result.stderr


# --------------------------------------------------------------------------------------
# verified load
# --------------------------------------------------------------------------------------
def _flip_middle(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(0xFF ^ b for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_mid_shard_are_caught_by_both_loaders(tmp_path):
    from transformers import AutoModelForCausalLM

    _, out, _ = _saved(tmp_path)
    shard = out / checkpoint.SINGLE_FILE
    _flip_middle(shard)
    with pytest.raises(checkpoint.CheckpointError, match=f"{shard.name} is corrupt: its SHA-256"):
        checkpoint.load(str(out))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        AutoModelForCausalLM.from_pretrained(out)


def test_non_finite_factors_are_named_even_when_the_hash_matches(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    _, out, _ = _saved(tmp_path)
    shard = out / checkpoint.SINGLE_FILE
    tensors = load_file(str(shard))
    tensors["model.layers.1.self_attn.k_proj.V"][3, 1] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256.*model.layers.1.self_attn.k_proj.V"):
        checkpoint.load(str(out))
    checkpoint.write_checksums(str(out))  # a writer that hashed NaNs: the finite check still catches them
    with pytest.raises(checkpoint.CheckpointError, match="tensor model.layers.1.self_attn.k_proj.V holds NaN"):
        checkpoint.load(str(out))
    with pytest.raises(checkpoint.CheckpointError, match="model.layers.1.self_attn.k_proj.V holds NaN"):
        AutoModelForCausalLM.from_pretrained(out)


def test_sha256sums_is_what_coreutils_checks(tmp_path):
    _, out, _ = _saved(tmp_path)
    line = (out / checkpoint.CHECKSUMS_FILE).read_text().strip()
    digest, name = line.split("  ")
    assert name == checkpoint.SINGLE_FILE and digest == checkpoint.sha256_file(str(out / name))
    import hashlib

    assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# the CLI: refusing random linears, dense export, generation
# --------------------------------------------------------------------------------------
def test_eval_refuses_a_checkpoint_whose_linears_would_be_random(tmp_path, capsys):
    _, out, _ = _saved(tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["eval", "--model", str(out), "--eval-sets", "", "--fidelity-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "initialised at random" in err and "quantization_config" in err and len(err.strip().splitlines()) == 1


def test_export_dense_loads_without_the_package(tmp_path, capsys):
    model, out, ids = _saved(tmp_path)
    dense_dir = tmp_path / "dense"
    assert cli.main(["export", "--model", str(out), "--dense", str(dense_dir)]) == 0
    assert "dense checkpoint" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    torch.save(ids, tmp_path / "ids.pt")
    result = _run_python(  # a fresh process that never imports lowrank_engine
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m, info = AutoModelForCausalLM.from_pretrained({str(dense_dir)!r}, output_loading_info=True)\n"
        "assert not info['missing_keys'] and not info['unexpected_keys'], info\n"
        "assert 'lowrank_engine' not in sys.modules\n"
        f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n")
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert cli.main(["export", "--model", str(out), "--dense", str(dense_dir)]) == 2  # never overwrites


def test_generate_is_greedy_and_matches_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, out, _ = _saved(tmp_path)
    prompt = "The engine compresses"
    assert cli.main(["generate", "--model", str(out), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    tok = tiny_tokenizer()
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = tok(prompt, return_tensors="pt")
    expected = tok.decode(hf.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)[0,
                          ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text == prompt + expected + "\n"
    assert cli.main(["generate", "--model", str(out), "--prompt", prompt, "--temperature", "0.8", "--seed", "1"]) == 0
    assert cli.main(["generate", "--model", str(out), "--prompt", prompt, "--temperature", "-1"]) == 2


# --------------------------------------------------------------------------------------
# zero-shot through lm-eval
# --------------------------------------------------------------------------------------
SAMPLE_ROWS = {  # llm-foundry's schema, as in $LOWRANK_ENGINE_DATA/zeroshot
    "arc_easy": {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide",
                                                                                 "helium", "argon"], "gold": 1},
    "arc_challenge": {"query": "Question: What makes day and night?", "choices": ["orbit", "rotation", "tides",
                                                                                  "seasons"], "gold": 1},
    "piqa": {"query": "Question: How do I open a jar?\n", "choices": ["Twist the lid.", "Paint the lid."], "gold": 0},
    "openbookqa": {"query": "Predators eat", "choices": ["lions", "humans", "bunnies", "grass"], "gold": 2},
    "lambada_openai": {"context": "She picked up the phone and said", "continuation": "hello"},
}


@pytest.fixture
def sample_data_dir(tmp_path):
    (tmp_path / "zeroshot").mkdir()
    for name, row in SAMPLE_ROWS.items():
        with open(tmp_path / "zeroshot" / zeroshot.LOCAL_TASKS[name][0], "w") as f:
            f.write(json.dumps(row) + "\n")
    return str(tmp_path)


def _render_stock(template, doc):
    """The stock YAML's template applied as lm-eval applies it: a document field, else a Jinja template."""
    from lm_eval.utils import apply_template

    return doc[template] if template in doc else apply_template(template, doc)


def _data_dirs(sample_data_dir):
    dirs = [sample_data_dir]
    if os.environ.get("LOWRANK_ENGINE_DATA"):  # the real files too, when they are here
        dirs.append(os.environ["LOWRANK_ENGINE_DATA"])
    return dirs


@pytest.mark.parametrize("name", list(zeroshot.LOCAL_TASKS))
def test_local_task_renders_like_the_stock_yaml(sample_data_dir, name):
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = load_yaml(zeroshot._stock_index()[name].yaml_path, resolve_func=True)  # the installed package's file
    for data_dir in _data_dirs(sample_data_dir):
        task = zeroshot.local_task(name, data_dir)
        doc = task.eval_docs[0]
        row = json.loads(open(os.path.join(data_dir, "zeroshot", zeroshot.LOCAL_TASKS[name][0])).readline())
        assert doc == zeroshot.LOCAL_TASKS[name][1](row)
        text = _render_stock(stock["doc_to_text"], doc)
        target = _render_stock(stock["doc_to_target"], doc)
        assert task.doc_to_text(doc) == text
        assert task.config.metric_list == stock["metric_list"] and task.OUTPUT_TYPE == stock["output_type"]
        if stock["output_type"] == "multiple_choice":
            choices = ast.literal_eval(_render_stock(stock["doc_to_choice"], doc))
            assert task.doc_to_choice(doc) == choices == row["choices"]
            assert task.doc_to_target(doc) == int(target) == row["gold"]
            assert row["query"].rstrip("\n") in text or text == row["query"]
        else:  # the passage splits back into llm-foundry's context and continuation
            assert task.doc_to_target(doc) == target == " " + row["continuation"]
            assert text == row["context"]


def test_without_a_data_dir_the_stock_hub_tasks_are_used(monkeypatch):
    monkeypatch.delenv("LOWRANK_ENGINE_DATA", raising=False)
    assert zeroshot.build_tasks(["piqa", "arc_easy"]) == ["piqa", "arc_easy"]
    with pytest.raises(zeroshot.ZeroShotError, match="hellaswag"):
        zeroshot.parse_tasks("piqa,hellaswag")


def test_eval_scores_zero_shot_tasks_through_lm_eval(tmp_path, sample_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("LOWRANK_ENGINE_DATA", sample_data_dir)
    _, out, _ = _saved(tmp_path)
    assert cli.main(["eval", "--model", str(out), "--eval-sets", "", "--fidelity-samples", "0", "--tasks",
                     "arc_easy,piqa,lambada_openai", "--limit", "1", "--json", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["arc_easy_n"] == record["piqa_n"] == record["lambada_openai_n"] == 1
    assert record["arc_easy_acc"] in (0, 1) and record["piqa_acc_norm"] in (0, 1)
    assert record["lambada_openai_acc_norm"] is None and record["lambada_openai_acc"] in (0, 1)
    with pytest.raises(SystemExit):  # an unknown task is a usage error, before anything loads
        cli.main(["eval", "--model", str(out), "--tasks", "hellaswag"])


@pytest.mark.parametrize("block, message", [
    ({"quant_method": "gptq", "format_version": 2, "ranks": {"a": 4}}, "not a 'lowrank' block"),
    ({"quant_method": "lowrank", "format_version": 3, "ranks": {"a": 4}}, "format version 3"),
    ({"quant_method": "lowrank", "format_version": 2, "ranks": [4]}, "no 'ranks' map"),
    ({"quant_method": "lowrank", "format_version": 2, "ranks": {"a": 0}}, "positive integers"),
    ({"quant_method": "lowrank", "format_version": 2, "ranks": {"a": 4}, "modules_to_not_convert": "lm_head"},
     "modules_to_not_convert"),
])
def test_every_reader_refuses_a_bad_quantization_config_alike(tmp_path, block, message):
    """The engine's loader and the transformers quantizer (and the vLLM plugin) check the block through one
    function, so they accept and refuse the same blocks with the same words."""
    from lowrank_engine import hf_quantizer

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": block}))
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.read_quantization_config(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        hf_quantizer.LowRankConfig(**block)
