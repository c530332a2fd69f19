"""vLLM serves compressed checkpoints through the `lowrank` plugin (lowrank_engine/vllm_plugin.py).

vLLM lives in its own environment (`make serve-venv`, which `make test` builds): these tests run its
Python in subprocesses (scripts in tests/vllm_scripts/) and fail, not skip, when it is missing.
LOWRANK_ENGINE_SERVE_PYTHON points them at another environment's python.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "vllm_scripts"
MAX_TOKENS = 32
TOP2_GAP_LIMIT = 0.01
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\n",
    "The theory of relativity was developed by",
    "My favourite recipe for pancakes starts with",
]


@pytest.fixture(scope="session")
def serve_python() -> str:
    path = os.environ.get("LOWRANK_ENGINE_SERVE_PYTHON") or str(REPO / ".venv-serve" / "bin" / "python")
    if not os.path.exists(path):
        pytest.fail(f"the vLLM serve environment is missing ({path}): build it with `make serve-venv` "
                    "(`make test` builds it), or point LOWRANK_ENGINE_SERVE_PYTHON at one", pytrace=False)
    return path


def serve_env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: SmolLM2 at 512 tokens needs a few MiB
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_serve(serve_python: str, args: list, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([serve_python, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=serve_env())
    proc.log = (proc.stdout + proc.stderr)[-6000:]
    return proc


# projections the fixture keeps dense: vLLM fuses the first two with factorized ones (qkv_proj, gate_up_proj);
# the third is a whole vLLM layer left to vLLM's own dense method
DENSE_IN_FUSED = ["model.layers.1.self_attn.v_proj", "model.layers.2.mlp.up_proj"]
DENSE_LAYER = "model.layers.3.self_attn.o_proj"


@pytest.fixture(scope="session")
def compressed_smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M compressed by the CLI (plain SVD, ratio 0.2): q/k/v and gate/up get different ranks, and
    a rank map keeps three projections dense (DENSE_IN_FUSED, DENSE_LAYER)."""
    from lowrank_engine import cli

    root = tmp_path_factory.mktemp("vllm")
    out = root / "smollm2-svd-0.2"
    (root / "ranks.json").write_text(json.dumps({name: None for name in [*DENSE_IN_FUSED, DENSE_LAYER]}))
    argv = ["compress", "--model", "smollm2-135m", "--method", "svd", "--ratio", "0.2", "--calibration", "self",
            "--nsamples", "4", "--seqlen", "128", "--eval-sets", "", "--fidelity-samples", "0", "--quiet",
            "--rank-map", str(root / "ranks.json"), "--output", str(out)]
    assert cli.main(argv) == 0
    return out


def variant(checkpoint: Path, directory: Path, edit) -> Path:
    """A copy of `checkpoint` whose config.json went through `edit` (the shards are linked, not copied)."""
    directory.mkdir()
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (directory / item.name).symlink_to(item)
    config = json.loads((checkpoint / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


# --------------------------------------------------------------------------------------------------
# tensor parallelism: 2 ranks simulated on the CPU
# --------------------------------------------------------------------------------------------------
def test_tensor_parallel_rules_on_two_simulated_ranks(serve_python):
    proc = run_serve(serve_python, [SCRIPTS / "tp_shards.py"], timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.log


# --------------------------------------------------------------------------------------------------
# offline generation against transformers
# --------------------------------------------------------------------------------------------------
def transformers_greedy(model, prompt_ids: list, steps: int):
    """Greedy continuation and, per step, the gap between the two largest logits."""
    ids, tokens, gaps = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            tokens.append(int(logits.argmax()))
            ids.append(tokens[-1])
    return tokens, gaps


def test_vllm_offline_generation_matches_transformers(serve_python, compressed_smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(compressed_smollm2)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "vllm.json"
    # vLLM's default compilation (torch.compile with inductor on the CPU): the plugin's ops must trace
    proc = run_serve(serve_python, [SCRIPTS / "generate.py", compressed_smollm2, tmp_path / "prompts.json", out,
                                    "--dtype", "float32", "--max-tokens", MAX_TOKENS], timeout=1200)
    assert proc.returncode == 0, proc.log
    result = json.loads(out.read_text())
    assert "NONE" not in result["compilation_mode"], result["compilation_mode"]
    # every block's four vLLM linears run the low-rank method (no silent dense fallback), a fused layer with a
    # dense projection too; only the one whole layer kept dense runs vLLM's dense method
    blocks = json.loads((compressed_smollm2 / "config.json").read_text())["num_hidden_layers"]
    assert len(result["factorized_layers"]) == 4 * blocks - 1, result["factorized_layers"]
    assert not any(name.startswith(DENSE_LAYER) for name in result["factorized_layers"]), result["factorized_layers"]

    model = AutoModelForCausalLM.from_pretrained(compressed_smollm2, dtype=torch.float32).eval()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"
    for name in [*DENSE_IN_FUSED, DENSE_LAYER]:
        assert type(model.get_submodule(name)) is torch.nn.Linear, name
    matches, divergences = 0, []
    for i, (ids, vllm_tokens) in enumerate(zip(prompts, result["tokens"])):
        hf_tokens, gaps = transformers_greedy(model, ids, MAX_TOKENS)
        assert len(vllm_tokens) == MAX_TOKENS
        first = next((j for j, (a, b) in enumerate(zip(vllm_tokens, hf_tokens)) if a != b), None)
        if first is None:
            matches += 1
            continue
        divergences.append({"prompt": i, "position": first, "vllm": vllm_tokens[first],
                            "transformers": hf_tokens[first], "transformers_top2_gap": gaps[first]})
    for d in divergences:  # reported, whatever the verdict
        warnings.warn(f"vLLM and transformers diverge: {d}")
    assert matches >= 7, divergences
    assert all(d["transformers_top2_gap"] < TOP2_GAP_LIMIT for d in divergences), divergences


# --------------------------------------------------------------------------------------------------
# vllm serve: an OpenAI-style completion
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine processes too), SIGKILL after 60 s."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    except ProcessLookupError:
        pass  # it died on its own: the assertion above says why
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_vllm_serve_answers_a_completion(serve_python, compressed_smollm2, tmp_path):
    port = free_port()
    vllm = str(Path(serve_python).parent / "vllm")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([vllm, "serve", str(compressed_smollm2), "--host", "127.0.0.1", "--port", str(port),
                               "--max-model-len", "512", "--dtype", "float32", "--served-model-name", "smollm2-lowrank"],
                              stdout=log, stderr=subprocess.STDOUT, env=serve_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in 900 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": "smollm2-lowrank", "prompt": "The capital of France is", "max_tokens": 8,
                             "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["object"] == "text_completion", answer
        assert answer["usage"]["completion_tokens"] == 8, answer
        assert isinstance(answer["choices"][0]["text"], str) and answer["choices"][0]["text"], answer
    finally:
        stop(server)
        log.close()
    assert server.returncode is not None


# --------------------------------------------------------------------------------------------------
# bad checkpoints fail to load, saying why
# --------------------------------------------------------------------------------------------------
def load_fails(serve_python, model: Path) -> str:
    proc = run_serve(serve_python, [SCRIPTS / "load.py", model], timeout=600)
    assert proc.returncode != 0, f"a bad checkpoint loaded:\n{proc.log}"
    return proc.stdout + proc.stderr


def test_corrupt_quantization_config_fails_clearly(serve_python, compressed_smollm2, tmp_path):
    def drop_ranks(config):
        del config["quantization_config"]["ranks"]

    log = load_fails(serve_python, variant(compressed_smollm2, tmp_path / "no-ranks", drop_ranks))
    assert "quantization_config has no 'ranks' map" in log, log[-6000:]


def test_factor_shape_mismatch_fails_clearly(serve_python, compressed_smollm2, tmp_path):
    name = "model.layers.3.self_attn.k_proj"
    ranks = json.loads((compressed_smollm2 / "config.json").read_text())["quantization_config"]["ranks"]

    def wrong_rank(config):
        config["quantization_config"]["ranks"][name] -= 1

    log = load_fails(serve_python, variant(compressed_smollm2, tmp_path / "wrong-rank", wrong_rank))
    assert name in log and f"config.json's quantization_config gives it rank {ranks[name] - 1}" in log, log[-6000:]
