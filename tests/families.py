"""Tiny random configs of every supported family, for the per-family reference tests and the README table.

Adding a family to actpatch is one entry in ``actpatch/model/architectures.py`` plus one config here: the
parametrised tests in ``test_families.py`` then run every check on it. Each config is as small as it can be while
keeping what makes the family different (GQA, a fused layout, a parallel block, a scale), with 3 layers so that a
patch has a layer before and after it.
"""

from __future__ import annotations

import transformers as T

_DIMS = dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, intermediate_size=64, max_position_embeddings=128)
_GQA = dict(_DIMS, num_key_value_heads=2)


def _moe(**kw):
    return dict(_GQA, intermediate_size=32, **kw)


# family -> (config class, keyword arguments); vocab_size is added by ``make_config``
CONFIGS = {
    "gpt2": (T.GPT2Config, dict(n_layer=3, n_head=4, n_embd=32, n_positions=128)),
    "llama": (T.LlamaConfig, _GQA),
    "mistral": (T.MistralConfig, dict(_GQA, sliding_window=4)),
    "qwen2": (T.Qwen2Config, _GQA),  # q/k/v biases
    "qwen3": (T.Qwen3Config, dict(_GQA, head_dim=8)),  # per-head q/k RMSNorm
    "smollm3": (T.SmolLM3Config, dict(_GQA, no_rope_layers=[1, 0, 1], pad_token_id=0)),  # layer 1 has no rotary
    "starcoder2": (T.Starcoder2Config, dict(_GQA, sliding_window=4)),
    "granite": (T.GraniteConfig, dict(_GQA, residual_multiplier=0.5, attention_multiplier=0.3, embedding_multiplier=3.0,
                                      logits_scaling=4.0)),
    "qwen2_moe": (T.Qwen2MoeConfig, _moe(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2)),
    "qwen3_moe": (T.Qwen3MoeConfig, _moe(head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "mixtral": (T.MixtralConfig, _moe(num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": (T.OlmoeConfig, _moe(num_experts=4, num_experts_per_tok=2)),
    "stablelm": (T.StableLmConfig, dict(_GQA, partial_rotary_factor=0.5)),
    "stablelm_parallel": (T.StableLmConfig, dict(_GQA, use_parallel_residual=True)),
    "cohere": (T.CohereConfig, dict(_GQA, logit_scale=0.25)),
    "phi": (T.PhiConfig, dict(_DIMS, partial_rotary_factor=0.5)),
    "phi3": (T.Phi3Config, dict(_GQA, pad_token_id=0)),
    "gemma2": (T.Gemma2Config, dict(_GQA, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=30.0,
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma3": (T.Gemma3TextConfig, dict(_DIMS, num_key_value_heads=1, head_dim=16, sliding_window=4,
                                        final_logit_softcapping=30.0,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "olmo2": (T.Olmo2Config, _DIMS),
    "gpt_neox": (T.GPTNeoXConfig, _DIMS),
    "gpt_neo": (T.GPTNeoConfig, dict(num_layers=3, num_heads=4, hidden_size=32, max_position_embeddings=128,
                                     attention_types=[[["global", "local", "global"], 1]], window_size=4)),
    "gptj": (T.GPTJConfig, dict(n_layer=3, n_head=4, n_embd=32, rotary_dim=4, n_positions=128)),
    "falcon": (T.FalconConfig, dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, multi_query=True,
                                    parallel_attn=True, new_decoder_architecture=False)),  # Falcon-7B: MQA, one norm
    "falcon_new": (T.FalconConfig, dict(num_hidden_layers=3, num_attention_heads=4, num_kv_heads=2, hidden_size=32,
                                        new_decoder_architecture=True)),  # Falcon-40B: grouped qkv, two norms
    "falcon_seq": (T.FalconConfig, dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, multi_query=False,
                                        parallel_attn=False, new_decoder_architecture=False)),  # per-head qkv
    "opt": (T.OPTConfig, dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                              max_position_embeddings=128, word_embed_proj_dim=16)),  # project_in / project_out
    "opt_post": (T.OPTConfig, dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                                   max_position_embeddings=128, do_layer_norm_before=False,
                                   word_embed_proj_dim=16)),  # OPT-350m
    "bloom": (T.BloomConfig, dict(n_layer=3, n_head=4, hidden_size=32)),
    "gpt_bigcode": (T.GPTBigCodeConfig, dict(n_layer=3, n_head=4, n_embd=32, n_positions=128, multi_query=True)),
}


def make_config(family: str, vocab_size: int = 50257):
    """The tiny config of ``family`` (a key of ``CONFIGS``), sized for GPT-2's tokenizer by default."""
    cls, kwargs = CONFIGS[family]
    # token ids the GPT-2 tokenizer knows; some configs default to ids past a small vocabulary
    ids = dict(bos_token_id=0, eos_token_id=0) if vocab_size < 50257 else dict(bos_token_id=50256, eos_token_id=50256)
    return cls(vocab_size=vocab_size, **ids, **kwargs)
