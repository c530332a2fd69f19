import contextlib
import os

# Triton kernels run on the CPU through the interpreter; this must precede any kernel import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see lowrank_engine/__init__.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def devices():
    """Parameters for a device argument: "cpu", and "cuda" marked `gpu` (benchmarks/device_suite.py runs
    `pytest -m gpu` on a lent GPU) and skipped where no GPU is present."""
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


@contextlib.contextmanager
def intra_op_threads(count: int):
    """torch's intra-op thread count inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    yield


def tiny_config(kind: str = "llama", layers: int = 2, **overrides):
    """Small randomly initialised configs of the architectures we claim to support."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=48, intermediate_size=112, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", layers: int = 2, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers, **overrides))
    return model.eval()


@pytest.fixture
def make_model():
    return tiny_model


SAMPLE_TEXT = (
    "The engine compresses the linear layers of a transformer into low-rank factor pairs. "
    "Calibration text flows through the model one block at a time, and the statistics of each "
    "group of linears are accumulated in float32 before whitening and a truncated SVD. "
) * 40


def tiny_tokenizer():
    """A small BPE tokenizer trained on the fly (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_checkpoint(root, model):
    """`root/model` (the model with a tokenizer) and `root/calib.txt`; returns root."""
    tokenizer = tiny_tokenizer()
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text(SAMPLE_TEXT)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny LLaMA (GQA) checkpoint with a tokenizer, plus a calibration text file."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_model("llama", layers=2))
