"""A tiny random model of every model_type that both mlx-lm and transformers implement.

`both_types()` lists the types; `ZOO_CONFIGS[t]` holds the config kwargs of a tiny model of type t
(the shape of tests/tiny_models.py: hidden 96, 3 layers, 4 heads of dim 24, 2 kv heads, MLP 192,
128 positions, the 512-token test tokenizer); `build(t, out_dir)` makes and saves one with
transformers; `UNBUILDABLE` names the types that cannot be made to load in both libraries, and why.

Most folders are a plain `save_pretrained`. Where mlx-lm reads only what the published checkpoints
carry, `SAVED_KEYS` writes those keys into config.json, and a few types are saved in another
layout (`INTERNAL_FORMAT`, `TEXT_ONLY`, `BASE_MODEL`). Rope settings are left as transformers 5
writes them (under rope_parameters): the report shows which types mlx-lm then cannot load.

    python -m tests.zoo     # build each, load it with both libraries, compare the last logits
"""

import contextlib
import importlib.util
import io
import json
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.auto import modeling_auto

from tests.tiny_models import _randomize, build_tokenizer

# The shared text shape (tests/tiny_models.py): hidden 96, 3 layers, 4 query heads of dim 24,
# 2 kv heads, MLP 192.
T = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
         head_dim=24, intermediate_size=192, max_position_embeddings=128)
# Small MoE: 4 experts, top-2, expert MLP 64.
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
# Multi-head latent attention (DeepSeek-V2 style): q/kv ranks, 16 + 8 query/key dims, 24 values.
MLA = dict(kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=24)
WINDOW = 4  # sliding windows and attention chunks shorter than the 16-token test prompt
S, F = "sliding_attention", "full_attention"


def _tiny_vision(**extra) -> dict:
    """A one-block, 32-wide vision tower: it is never run, only built and saved."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14, **extra)


def _c(*parts: dict, **extra) -> dict:
    """Merge config parts; later keys win."""
    out: dict = {}
    for part in parts + (extra,):
        out.update(part)
    return out


# transformers' MLA configs take head_dim as the rope part; every head has its own keys.
MLA_T = _c(T, MLA, head_dim=8, num_key_value_heads=4)


# model_type -> config kwargs. A "text_config" entry makes a composite (image-text-to-text)
# checkpoint whose text model mlx-lm reads under `language_model`. Keys transformers does not know
# are kept in config.json, where mlx-lm reads them.
ZOO_CONFIGS: dict[str, dict] = {
    "afmoe": _c(T, MOE, num_experts=4, num_shared_experts=1, num_dense_layers=1,
                global_attn_every_n_layers=3, sliding_window=WINDOW, layer_types=[S, S, F]),
    # mlx-lm requires the bias/norm switches transformers' config does not have.
    "apertus": _c(T, mlp_bias=False, attention_bias=False, post_norm=False, qk_norm=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=64)),
    "bailing_hybrid": _c(MLA_T, MOE, num_experts=4, num_shared_experts=1,
                         first_k_dense_replace=1, layer_group_size=3,
                         layer_types=["linear_attention", "linear_attention", F],
                         linear_head_dim=24, linear_num_heads=4, num_expert_group=1,
                         topk_group=1, group_norm_size=1),
    "bitnet": _c(T),
    # Differs (0.65 bits): mlx-lm reads its own default rope_theta (8e6), transformers' is in
    # rope_parameters (5e5).
    "cohere": _c(T),
    # mlx-lm reads the window pattern, not layer_types: 3 = sliding, sliding, full. Differs a
    # little: mlx-lm's default rope_theta (5e4) against transformers' 1e4 in rope_parameters.
    "cohere2": _c(T, sliding_window=WINDOW, layer_types=[S, S, F], sliding_window_pattern=3),
    "dbrx": dict(d_model=96, n_heads=4, n_layers=3, max_seq_len=128,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    # mlx-lm's deepseek_v2 needs a YaRN rope_scaling (as the published checkpoints have).
    "deepseek_v2": _c(MLA_T, MOE, n_routed_experts=4, n_shared_experts=1,
                      first_k_dense_replace=1, topk_method="greedy",
                      rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0,
                                           original_max_position_embeddings=64, beta_fast=32.0,
                                           beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)),
    "deepseek_v3": _c(MLA_T, MOE, n_routed_experts=4, n_shared_experts=1,
                      first_k_dense_replace=1, n_group=1, topk_group=1),
    # Differs: the DSA indexer keeps 4 of 16 keys; its relu scores tie at 0 and torch.topk and
    # mx.argpartition break the ties differently (index_topk >= 16: they agree).
    "deepseek_v32": _c(MLA_T, MOE, n_routed_experts=4, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=1, topk_group=1, index_topk=4,
                       index_head_dim=16, index_n_heads=2),
    "dots1": _c(T, MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1),
    "ernie4_5": _c(T),
    # Differs: mlx-lm drops moe_statics.e_score_correction_bias, which transformers adds to the
    # router probabilities to choose the experts.
    "ernie4_5_moe": _c(T, moe_num_experts=4, moe_k=2, moe_intermediate_size=64,
                       moe_num_shared_experts=1, moe_layer_start_index=1),
    "exaone": _c(T),
    "exaone4": _c(T, sliding_window=WINDOW, layer_types=[S, S, F]),
    "exaone_moe": _c(T, MOE, num_experts=4, num_shared_experts=1, first_k_dense_replace=1,
                     sliding_window=WINDOW, layer_types=[S, S, F],
                     is_moe_layer=[False, True, True]),
    # Differs: mlx-lm reads its own default rope_theta (1e11); transformers' 1e4 is only in
    # rope_parameters.
    "falcon_h1": _c(T, mamba_d_ssm=96, mamba_n_heads=4, mamba_d_head=24, mamba_d_state=16,
                    mamba_chunk_size=8),
    "falcon_mamba": dict(hidden_size=96, num_hidden_layers=3, intermediate_size=192,
                         state_size=8, time_step_rank=8),
    "gemma": _c(T),
    # Differs: mlx-lm's gemma2 applies no sliding window, and this one is shorter than the prompt.
    "gemma2": _c(T, query_pre_attn_scalar=24, sliding_window=WINDOW,
                 final_logit_softcapping=9.7, attn_logit_softcapping=12.3),
    # Differs a little (gemma3, gemma3_text): mlx-lm rounds the embedding scale sqrt(96) through
    # bf16 (9.8125), transformers uses 9.798. mlx-lm reads sliding_window_pattern, not layer_types.
    "gemma3": dict(text_config=_c(T, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                  layer_types=[S, S, F], sliding_window_pattern=3),
                   vision_config=_tiny_vision(), mm_tokens_per_image=4),
    "gemma3_text": _c(T, query_pre_attn_scalar=24, sliding_window=WINDOW,
                      layer_types=[S, S, F], sliding_window_pattern=3),
    "gemma3n": dict(text_config=_c(T)),
    # transformers' Gemma-4 replaces multimodal ids by pad_token_id, so it needs one.
    "gemma4": dict(text_config=_c(T, sliding_window=WINDOW, layer_types=[S, S, F],
                                  vocab_size_per_layer_input=512, hidden_size_per_layer_input=16,
                                  global_head_dim=48, pad_token_id=1)),
    "gemma4_text": _c(T, sliding_window=WINDOW, layer_types=[S, S, F],
                      vocab_size_per_layer_input=512, hidden_size_per_layer_input=16,
                      global_head_dim=48),
    "gemma4_unified": dict(text_config=_c(T, sliding_window=WINDOW, layer_types=[S, S, F],
                                          global_head_dim=48, pad_token_id=1)),
    # Differs: mlx-lm's glm rotates the whole head; transformers' only partial_rotary_factor (0.5).
    "glm": _c(T),
    "glm4": _c(T),
    "glm4_moe": _c(T, MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1),
    # Differs: mlx-lm reads its own default rope_theta (1e6); transformers' 1e4 is in
    # rope_parameters.
    "glm4_moe_lite": _c(MLA_T, MOE, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1),
    # Differs: the DSA indexer's top-4 ties, as deepseek_v32.
    "glm_moe_dsa": _c(MLA_T, MOE, n_routed_experts=4, n_shared_experts=1,
                      first_k_dense_replace=1, index_topk=4, index_head_dim=16,
                      index_n_heads=2, topk_method="noaux_tc", scoring_func="sigmoid",
                      moe_layer_freq=1),
    "gpt2": dict(n_embd=96, n_layer=3, n_head=4, n_inner=384, n_positions=128, n_ctx=128),
    "gpt_bigcode": dict(n_embd=96, n_layer=3, n_head=4, n_inner=384, n_positions=128),
    # MLP width 4 * hidden: mlx-lm's gpt_neox hard-codes it.
    "gpt_neox": _c(T, intermediate_size=384),
    "gpt_oss": _c(T, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=WINDOW, layer_types=[S, S, F],
                  rope_parameters=dict(rope_type="yarn", rope_theta=1.5e5, factor=2.0,
                                       original_max_position_embeddings=64, beta_fast=32.0,
                                       beta_slow=1.0, truncate=False)),
    "gptj": dict(n_embd=96, n_layer=3, n_head=4, n_positions=128, rotary_dim=12),
    "granite": _c(T),
    "granitemoe": _c(T, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    # Differs: transformers applies RoPE only with position_embedding_type "rope" (its default,
    # None, is NoPE); mlx-lm applies it unless the type is "nope", so a null means RoPE there.
    "granitemoehybrid": _c(T, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                           shared_intermediate_size=64, mamba_n_heads=4, mamba_d_head=48,
                           mamba_d_state=16, mamba_chunk_size=8,
                           layer_types=["linear_attention", "linear_attention", F]),
    "helium": _c(T),
    "hunyuan_v1_dense": _c(T),
    "internlm3": _c(T),
    "iquestcoder": _c(T),
    # Differs: transformers keeps the top-k softmax router weights unnormalised, mlx-lm takes a
    # softmax over the k chosen logits (they agree with num_experts=1).
    "jamba": _c(T, intermediate_size=64, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                expert_layer_offset=1, attn_layer_period=3, attn_layer_offset=2,
                mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False),
    "kimi_k25": dict(text_config=_c(MLA_T, MOE, n_routed_experts=4, n_shared_experts=1,
                                    first_k_dense_replace=1, n_group=1, topk_group=1),
                     vision_config=dict(patch_size=14, pos_emb_height=4, pos_emb_width=4,
                                        pos_emb_time=2, num_attention_heads=2,
                                        num_hidden_layers=1, hidden_size=32,
                                        intermediate_size=64),
                     projection_hidden_size=32),
    # mlx-lm reads the layer kinds from linear_attn_config (the published form).
    # No dense first layer: transformers writes every layer's MLP under block_sparse_moe, and
    # mlx-lm reads a dense one only under mlp.
    "kimi_linear": _c(MLA_T, MOE, num_experts=4, num_shared_experts=1,
                      first_k_dense_replace=0, q_lora_rank=None, linear_head_dim=24,
                      linear_num_heads=4,
                      layer_types=["linear_attention", "linear_attention", F],
                      linear_attn_config=dict(kda_layers=[1, 2], full_attn_layers=[3],
                                              head_dim=24, num_heads=4,
                                              short_conv_kernel_size=4)),
    "laguna": _c(T, MOE, num_experts=4, shared_expert_intermediate_size=64,
                 sliding_window=WINDOW, layer_types=[S, S, F]),
    "lfm2": _c(T, layer_types=["conv", F, "conv"], block_dim=96, block_ff_dim=192,
               conv_bias=False, block_auto_adjust_ff_dim=False),
    "lfm2_moe": _c(T, MOE, num_experts=4, num_dense_layers=1, layer_types=["conv", F, "conv"],
                   conv_bias=False),
    "llama": _c(T),
    # 4 layers: mlx-lm's llama4 hard-codes chunked attention on 3 of every 4 layers.
    "llama4": dict(text_config=_c(T, num_hidden_layers=4, intermediate_size=64,
                                  intermediate_size_mlp=192, num_local_experts=4,
                                  num_experts_per_tok=1, attention_chunk_size=WINDOW,
                                  interleave_moe_layer_step=2),
                   vision_config=_tiny_vision(vision_output_dim=32, projector_input_dim=32,
                                              projector_output_dim=96)),
    # mlx-lm's llama4_text is the dense variant (MobileLLM-R1): no MoE layers. Differs: mlx-lm
    # applies no chunked attention (plain causal mask) there.
    # Tied: mlx-lm names its untied head "output" and has no sanitize to rename lm_head.
    "llama4_text": _c(T, intermediate_size_mlp=192, moe_layers=[], attention_chunk_size=WINDOW,
                      tie_word_embeddings=True),
    "llava": dict(text_config=_c(T, model_type="llama"), vision_config=_tiny_vision()),
    # Each of the 2 layers holds 2 attentions and 2 dense MLPs.
    "longcat_flash": dict(hidden_size=96, num_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, max_position_embeddings=128,
                          ffn_hidden_size=96, expert_ffn_hidden_size=64, moe_topk=2,
                          n_routed_experts=4, zero_expert_num=2, kv_lora_rank=32,
                          q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
                          v_head_dim=24, head_dim=8, attention_method="MLA",
                          zero_expert_type="identity", mla_scale_q_lora=True,
                          mla_scale_kv_lora=True),
    "mamba": dict(hidden_size=96, num_hidden_layers=3, intermediate_size=192, state_size=8,
                  time_step_rank=8),
    "mamba2": dict(hidden_size=96, num_hidden_layers=3, num_heads=8, head_dim=24, state_size=16,
                   n_groups=1, chunk_size=8, intermediate_size=192),
    "mellum": _c(T, MOE, num_local_experts=4, sliding_window=WINDOW, layer_types=[S, S, F]),
    # Differs: transformers' window is sliding_window_size + 1 keys, mlx-lm's sliding_window_size.
    # mlx-lm reads the published keys: hybrid_layer_pattern (1 = sliding), moe_layer_freq, the
    # swa_* head shapes (transformers doubles the sliding layers' kv heads) and
    # sliding_window_size, which transformers turns into sliding_window = size + 1.
    "mimo_v2_flash": _c(T, MOE, n_routed_experts=4, v_head_dim=24, sliding_window_size=WINDOW,
                        layer_types=[F, S, S], mlp_layer_types=["dense", "sparse", "sparse"],
                        hybrid_layer_pattern=[0, 1, 1], moe_layer_freq=[0, 1, 1],
                        add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
                        swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_head_dim=24,
                        swa_v_head_dim=24, layernorm_epsilon=1e-5, rope_theta=5e6,
                        swa_rope_theta=1e4, partial_rotary_factor=0.334, topk_method="noaux_tc",
                        scoring_func="sigmoid", n_shared_experts=None),
    # mlx-lm's minicpm3 always builds a LongRoPE (SuScaledRoPE) from rope_scaling. Differs: mlx-lm
    # skips the hidden/dim_model_base logit scaling when the head is tied, and its SuScaledRoPE
    # always uses long_factor where transformers uses short_factor below the original context.
    "minicpm3": _c(MLA_T, rope_parameters=dict(rope_type="longrope", rope_theta=1e4,
                                               short_factor=[1.0, 1.1, 1.2, 1.3],
                                               long_factor=[1.0, 2.0, 3.0, 4.0],
                                               original_max_position_embeddings=128)),
    # transformers' minimax is MiniMax-Text-01 (lightning attention), mlx-lm's the M2 block:
    # with full attention only they share the layout.
    "minimax": _c(T, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                  layer_types=[F, F, F],
                  shared_intermediate_size=0, rotary_dim=24, use_qk_norm=False,
                  scoring_func="softmax"),
    "minimax_m2": _c(T, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                     rotary_dim=12,
                     shared_intermediate_size=0),
    # Half the head rotates (as published). transformers reads only
    # rope_parameters.partial_rotary_factor (rotary_dim is ignored), mlx-lm rotary_dim if given.
    "minimax_m3_vl": dict(text_config=_c(T, intermediate_size=64, num_local_experts=4,
                                         num_experts_per_tok=2,
                                         rope_parameters=dict(rope_type="default",
                                                              rope_theta=5e6,
                                                              partial_rotary_factor=0.5),
                                         rotary_dim=12, dense_intermediate_size=192,
                                         shared_intermediate_size=64, index_n_heads=2,
                                         index_head_dim=16, index_block_size=4,
                                         index_topk_blocks=2),
                          vision_config=_tiny_vision(), projector_hidden_size=32),
    "ministral3": _c(T),
    # Differs: mlx-lm (mistral -> llama) applies a window only with layer_types, which
    # transformers does not write for mistral.
    "mistral": _c(T, sliding_window=WINDOW),
    "mistral3": dict(text_config=_c(T, model_type="mistral", tie_word_embeddings=False),
                     vision_config=_tiny_vision(head_dim=16), tie_word_embeddings=False),
    # Mistral-4's head_dim is the whole query/key head (16 + 8): transformers derives the rope
    # fraction from it. A YaRN context of 64 -> 128, as the published one stretches 8k -> 1M.
    "mistral4": _c(MLA_T, MOE, n_routed_experts=4, n_shared_experts=1, head_dim=24,
                   rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0,
                                        original_max_position_embeddings=64, beta_fast=32.0,
                                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                        llama_4_scaling_beta=0.1)),
    "mixtral": _c(T, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "muse_glimmer": dict(text_config=_c(T, sliding_window=WINDOW, layer_types=[S, S, F]),
                         vision_config=_tiny_vision(pos_emb_height=4, pos_emb_width=4,
                                                    max_position_embeddings=16),
                         out_hidden_size=96, projector_hidden_size=32),
    "muse_spark": dict(text_config=_c(T, num_local_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=64, moe_hidden_size=64,
                                      sliding_window=WINDOW, layer_types=[S, S, F]),
                       vision_config=_tiny_vision(pos_emb_height=4, pos_emb_width=4,
                                                  max_position_embeddings=16),
                       audio_config=dict(hidden_sizes=[8, 16, 32, 32], depths=[1, 1, 1, 1],
                                         out_hidden_size=96),
                       out_hidden_size=96, projector_hidden_size=32),
    "nanochat": _c(T),
    "nemotron": _c(T),
    "nemotron_h": _c(T, layers_block_type=["mamba", "moe", "attention"],
                     mamba_num_heads=4, mamba_head_dim=24, ssm_state_size=16, n_groups=1,
                     chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=64, moe_shared_expert_intermediate_size=64),
    "olmo": _c(T),
    "olmo2": _c(T),
    "olmo3": _c(T, sliding_window=WINDOW, layer_types=[S, S, F]),
    "olmo_hybrid": _c(T, linear_num_key_heads=4, linear_num_value_heads=4,
                      linear_key_head_dim=24, linear_value_head_dim=24,
                      layer_types=["linear_attention", "linear_attention", F]),
    "olmoe": _c(T, intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "phi": _c(T),
    "phi3": _c(T),
    # mlx-lm's phimoe has biases on the attention projections and the head.
    # Differs: mlx-lm's default rope_theta (1e4) is read, transformers' (1e6) is only in
    # rope_parameters.
    "phimoe": _c(T, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                 attention_bias=True,
                 lm_head_bias=True),
    # Differs (qwen2, qwen2_moe): mlx-lm reads its own default rope_theta (1e6); transformers'
    # 1e4 is only in rope_parameters.
    "qwen2": _c(T),
    # Tied: mlx-lm reads tie_word_embeddings from text_config (default true), where
    # transformers 5 no longer writes it.
    "qwen2_5_vl": dict(tie_word_embeddings=True, text_config=_c(T, rope_parameters=dict(
                           rope_type="default", rope_theta=1e6, mrope_section=[4, 4, 4])),
                       vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                          num_heads=2, out_hidden_size=96,
                                          fullatt_block_indexes=[0])),
    "qwen2_moe": _c(T, MOE, num_experts=4, shared_expert_intermediate_size=64),
    "qwen2_vl": dict(tie_word_embeddings=True, text_config=_c(T, rope_parameters=dict(
                         rope_type="default", rope_theta=1e6, mrope_section=[4, 4, 4])),
                     vision_config=dict(depth=1, embed_dim=32, hidden_size=96, num_heads=2,
                                        mlp_ratio=2)),
    "qwen3": _c(T),
    # mlx-lm places full attention by full_attention_interval, not layer_types.
    "qwen3_5": dict(text_config=_c(T, linear_key_head_dim=24, linear_value_head_dim=24,
                                   linear_num_key_heads=2, linear_num_value_heads=4,
                                   layer_types=["linear_attention", "linear_attention", F],
                                   full_attention_interval=3),
                    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                       num_heads=2, out_hidden_size=96,
                                       num_position_embeddings=16, patch_size=8)),
    "qwen3_5_moe": dict(text_config=_c(T, MOE, num_experts=4, shared_expert_intermediate_size=64,
                                       linear_key_head_dim=24, linear_value_head_dim=24,
                                       linear_num_key_heads=2, linear_num_value_heads=4,
                                       layer_types=["linear_attention", "linear_attention",
                                                    F], full_attention_interval=3),
                        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                           num_heads=2, out_hidden_size=96,
                                           num_position_embeddings=16, patch_size=8)),
    "qwen3_moe": _c(T, MOE, num_experts=4),
    # mlx-lm places full attention by full_attention_interval, not layer_types.
    "qwen3_next": _c(T, MOE, num_experts=4, shared_expert_intermediate_size=64,
                     linear_key_head_dim=24, linear_value_head_dim=24,
                     linear_num_key_heads=2, linear_num_value_heads=4,
                     layer_types=["linear_attention", "linear_attention", F],
                     full_attention_interval=3),
    "qwen3_vl": dict(text_config=_c(T, rope_parameters=dict(
                         rope_type="default", rope_theta=5e5, mrope_section=[4, 4, 4])),
                     vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                        num_heads=2, out_hidden_size=96,
                                        num_position_embeddings=16,
                                        deepstack_visual_indexes=[0])),
    "qwen3_vl_moe": dict(text_config=_c(T, MOE, num_experts=4, rope_parameters=dict(
                             rope_type="default", rope_theta=5e5, mrope_section=[4, 4, 4])),
                         vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                            num_heads=2, out_hidden_size=96,
                                            num_position_embeddings=16,
                                            deepstack_visual_indexes=[0])),
    # mlx-lm's recurrent_gemma attention has one kv head. Differs a little: transformers rounds
    # the embedding scale sqrt(96) through bf16, mlx-lm does not.
    "recurrent_gemma": _c(T, num_key_value_heads=1, lru_width=96,
                          attention_window_size=WINDOW,
                          block_types=["recurrent", "recurrent", "attention"]),
    "seed_oss": _c(T),
    # Differs: mlx-lm reads its own default rope_theta (1e4); transformers' 2e6 is in
    # rope_parameters.
    "smollm3": _c(T, no_rope_layer_interval=3),
    "solar_open": _c(T, MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0,
                     partial_rotary_factor=1.0),
    "stablelm": _c(T),
    # Differs: mlx-lm reads its own default rope_theta (1e5); transformers' 1e4 is in
    # rope_parameters.
    "starcoder2": _c(T),
}

# Keys written into the saved config.json, spelled as the published checkpoints spell them:
# transformers 5 reads them (or ignores them) but writes another name or form, and mlx-lm reads
# only these. A nested "text_config" dict edits the text config.
SAVED_KEYS: dict[str, dict] = {
    "exaone": dict(num_layers=3, layer_norm_epsilon=1e-5),
    "exaone4": dict(sliding_window_pattern="LLG"),  # mlx-lm: a string of Local/Global
    # The published Ring/Ling-2.5 configs name this architecture, which mlx-lm maps to its
    # bailing_moe_v3 (KDA + MLA); its own bailing_hybrid module is the lightning-attention one.
    "bailing_hybrid": dict(architectures=["BailingMoeV3ForCausalLM"], num_experts_per_tok=2,
                           n_group=1, max_position_embeddings=128,
                           moe_shared_expert_intermediate_size=64),
    # transformers' kimi_linear has no rope at all; mlx-lm still requires the key.
    "kimi_linear": dict(rope_theta=10000.0),
    # Gemma-4-unified has no per-layer inputs; mlx-lm's text model adds them unless told 0.
    "gemma4_unified": dict(text_config=dict(global_head_dim=48, hidden_size_per_layer_input=0)),
    # transformers 5 renames the layer kinds (mamba -> linear_attention, attention -> full_...).
    "granitemoehybrid": dict(layer_types=["mamba", "mamba", "attention"]),
    "mellum": dict(num_experts=4),
    "qwen3_moe": dict(num_experts=4),
    "qwen3_vl_moe": dict(text_config=dict(num_experts=4, norm_topk_prob=True,
                                          tie_word_embeddings=False)),
    # mlx-lm requires tie_word_embeddings in text_config; transformers 5 writes it at the top.
    "qwen3_vl": dict(text_config=dict(tie_word_embeddings=False)),
    "gemma4": dict(text_config=dict(global_head_dim=48)),
    "gemma4_text": dict(global_head_dim=48),
}

# Saved with the model's own parameter names (save_original_format=False): mlx-lm reads those,
# not the original checkpoint names transformers 5 converts back to when saving.
# qwen3_5_moe: mlx-lm reads the fused experts.gate_up_proj (the published Qwen3.5 layout), which
# transformers converts back to per-expert weights when saving the original format.
INTERNAL_FORMAT = {"qwen3_5_moe"}

# Composite types saved without the vision tower (transformers initialises it when loading):
# mlx-lm's sanitize drops it only under top-level names transformers does not write.
TEXT_ONLY = {"muse_glimmer"}

# Saved as the bare base model (no head; the head is tied): the layout of the published GPT-2
# checkpoint, the only one mlx-lm's gpt2 reads (it prefixes "model." to every name).
BASE_MODEL = {"gpt2"}

# Types both libraries implement for which no tiny model loads in both; one line each.
UNBUILDABLE: dict[str, str] = {
    "olmo": "mlx-lm's olmo imports hf_olmo (package ai2-olmo, not installed) and exits otherwise",
    "gemma3n": "transformers builds Gemma-3n's vision tower with timm, which is not installed",
    "olmo_hybrid": "mlx-lm reads q/k/v_conv1d with input_layernorm names; transformers writes "
                   "either conv1d + input_layernorm or q/k/v_conv1d + attention_layer_norm",
    "kimi_k25": "transformers 5 writes the text layers as language_model.model.blocks.* (a blocks->"
                "layers rename reversed on save); mlx-lm reads ...layers.*",
    "bailing_hybrid": "transformers writes the KDA output projection as attention.dense, mlx-lm's "
                      "bailing_moe_v3 reads attention.o_proj (its bailing_hybrid is another model)",
    "nanochat": "mlx-lm reads the original nanochat names (transformer.h.*.attn.c_q, no sanitize); "
                "transformers writes model.layers.*.self_attn.q_proj",
    "qwen3_vl_moe": "transformers 5 writes experts.gate_up_proj as [E, 2I, H] (its load-time "
                    "transpose is not undone on save); mlx-lm reads the published [E, H, 2I]",
    "gpt_oss": "mlx-lm reads the experts as mxfp4 blocks (gate_up_proj_blocks) or split gate/up "
               "weights; transformers writes a dense interleaved experts.gate_up_proj [E, H, 2I]",
    "bitnet": "mlx-lm's bitnet reads only packed ternary weights (uint8 + weight_scale, run by a "
              "Metal kernel); transformers' BitNet writes dense float weights",
    "minimax": "transformers' minimax is MiniMax-Text-01 (softmax router), mlx-lm's the MiniMax-M2 "
               "block (sigmoid router with e_score_correction_bias): the layouts differ",
}


def _causal_names() -> dict:
    return dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _mlx_resolves(model_type: str) -> bool:
    """mlx_lm.utils._get_classes finds a module for the type (after MODEL_REMAPPING)."""
    from mlx_lm.utils import MODEL_REMAPPING, _get_classes

    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        if importlib.util.find_spec(f"mlx_lm.models.{name}") is None:
            return False
    except (ImportError, ValueError):  # a name with a dot ("kosmos-2.5")
        return False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # olmo prints before it exits
            _get_classes({"model_type": model_type})
    except SystemExit:  # a module that exits when its optional package is missing (olmo)
        return True
    except Exception:
        return False
    return True


def both_types() -> list[str]:
    """Model types transformers' causal-LM (or image-text-to-text) auto mapping and mlx-lm share.

    lfm2_vl is not among them: mlx-lm's module is named lfm2-vl and no remapping reaches it.
    Reached by hand (model_type "lfm2-vl"), it reads mlx-vlm's layout (language_model.model.*,
    an lm_head it forces untied), not the model.language_model.* tied layout transformers
    writes: 67 of 67 tensors unread (tried 2026-12-07).
    """
    names = set(_causal_names()) | set(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    return sorted(t for t in names if _mlx_resolves(t))


_TOKENIZER = None


def _tokenizer(out_dir: Path):
    """The test tokenizer, trained once per process and saved into out_dir."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_tokenizer(out_dir)
    else:
        _TOKENIZER.save_pretrained(out_dir)
    return _TOKENIZER


def auto_class(model_type: str):
    """The transformers auto class that loads a zoo checkpoint of this type."""
    if model_type in _causal_names():
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def build(model_type: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny `model_type` model with random weights; save it and the tokenizer."""
    from mlx_lens.loading.quiet import quiet_library_bars

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out_dir)
    kwargs = json.loads(json.dumps(ZOO_CONFIGS[model_type]))  # a deep copy
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=None)
    if "text_config" in kwargs:
        kwargs["text_config"] = {**ids, **kwargs["text_config"]}
        kwargs["vocab_size"] = len(tok)  # mlx-lm's gemma3 reads the top-level vocab_size
    else:
        kwargs = {**ids, **kwargs}
    config = AutoConfig.for_model(model_type, **kwargs, dtype="float32")
    torch.manual_seed(seed)
    composite = "text_config" in ZOO_CONFIGS[model_type]
    builder = AutoModelForImageTextToText if composite else auto_class(model_type)
    model = builder.from_config(config)
    _randomize(model)
    quiet_library_bars()
    target = model.base_model if model_type in BASE_MODEL else model
    state = None
    if model_type in TEXT_ONLY:
        state = {k: v for k, v in model.state_dict().items() if "language_model" in k
                 or k.startswith("lm_head")}
    target.save_pretrained(out_dir, save_original_format=model_type not in INTERNAL_FORMAT,
                          state_dict=state)
    if model_type in SAVED_KEYS:
        path = out_dir / "config.json"
        saved = json.loads(path.read_text())
        edits = dict(SAVED_KEYS[model_type])
        saved.setdefault("text_config", {}).update(edits.pop("text_config", {}))
        if not saved["text_config"]:
            del saved["text_config"]
        saved.update(edits)
        path.write_text(json.dumps(saved, indent=2))
    return out_dir


# ----------------------------------------------------------------------------- the report

PROMPT_IDS = [1, 77, 301, 15, 250, 9, 412, 33, 128, 500, 64, 2, 199, 311, 87, 450]  # 16 tokens


def _rope_overrides(config: dict) -> dict:
    """Diagnostic: transformers 5's rope_parameters as the flat keys mlx-lm reads."""
    text = config.get("text_config") or config
    rope = text.get("rope_parameters") or {}
    if "full_attention" in rope:  # per-layer-type rope: the full-attention layers'
        rope = rope["full_attention"]
    fixes: dict = {"rope_scaling": None}
    if "rope_theta" in rope:
        fixes["rope_theta"] = fixes["rotary_emb_base"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        fixes["partial_rotary_factor"] = fixes["rotary_pct"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        fixes["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    if "text_config" in config:
        return {"text_config": {**text, **fixes}}
    return fixes


def _layout_note(model_type: str) -> str:
    """How the saved folder departs from a plain save_pretrained, for the report."""
    parts = []
    if model_type in SAVED_KEYS:
        edits = dict(SAVED_KEYS[model_type])
        keys = sorted(edits.pop("text_config", {}))
        parts.append("config.json edits: " + ",".join(sorted(edits) + [f"text_config.{k}"
                                                                        for k in keys]))
    if model_type in INTERNAL_FORMAT:
        parts.append("saved in transformers' internal layout")
    if model_type in TEXT_ONLY:
        parts.append("saved without the vision tower")
    if model_type in BASE_MODEL:
        parts.append("saved as the base model (tied head)")
    return "; ".join(parts)


class _ForwardError(Exception):
    """mlx-lm loaded the model but its forward failed."""


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:150]


def _log_softmax_bits(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return (x - m - np.log(np.exp(x - m).sum())) / math.log(2)


def check(model_type: str, root: Path) -> dict:
    """Build one type, load it with both libraries and compare the last position's logits."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    row = dict(type=model_type, built=False, hf=False, mlx=False, bits=None, top1=None,
               secs=None, note="")
    path = root / model_type
    try:
        t0 = time.perf_counter()
        build(model_type, path)
        row["secs"] = time.perf_counter() - t0
        row["built"] = True
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        row["mb"] = size / 2**20
    except BaseException as exc:
        row["note"] = "build: " + _one_line(exc)
        return row
    ids = PROMPT_IDS
    try:
        model = auto_class(model_type).from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            hf_logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
        row["hf"] = True
    except BaseException as exc:
        row["note"] = "hf: " + _one_line(exc)
        hf_logits = None
    config = json.loads((path / "config.json").read_text())

    def mlx_run(model_config):
        """Load with mlx-lm (raising on failure), then forward (_ForwardError on failure)."""
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's olmo prints, then exits
            model, _ = load_model(path, model_config=model_config)
        try:
            out = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
        except BaseException as exc:
            raise _ForwardError("mlx forward: " + _one_line(exc)) from exc
        if hf_logits is None:
            return None, None
        if hf_logits.shape != out.shape:
            raise _ForwardError(f"vocab {hf_logits.shape} vs {out.shape}")
        a, b = _log_softmax_bits(hf_logits), _log_softmax_bits(out)
        return float(np.abs(a - b).max()), bool(a.argmax() == b.argmax())

    notes = [row["note"]] if row["note"] else []
    if layout := _layout_note(model_type):
        notes.append(layout)
    try:
        row["mlx"] = True
        row["bits"], row["top1"] = mlx_run(None)
    except BaseException as exc:
        plain_error = str(exc) if isinstance(exc, _ForwardError) else _one_line(exc)
        try:  # the diagnostic: does mlx-lm load it once given the flat rope keys?
            row["mlx"] = "cfg"
            row["bits"], row["top1"] = mlx_run(_rope_overrides(config))
            notes.append("mlx needs model_config rope keys; plain: " + plain_error[:90])
        except BaseException as exc2:
            if isinstance(exc, _ForwardError):  # it loads; its forward fails either way
                row["mlx"] = True
                notes.append(plain_error)
            elif isinstance(exc2, _ForwardError):
                notes.append("mlx needs model_config rope keys; " + str(exc2))
            else:
                row["mlx"] = False
                notes.append("mlx: " + _one_line(exc2 if "rope" in plain_error else exc))
    else:
        if row["bits"] is not None and row["bits"] > 0.01:  # is the difference the rope keys?
            try:
                bits, _ = mlx_run(_rope_overrides(config))
                if bits < row["bits"] / 2:
                    notes.append(f"with model_config rope keys: {bits:.2e} bits")
            except BaseException:
                pass
    row["note"] = " | ".join(notes)
    return row


def main(types: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    types = types or both_types()
    root = Path(tempfile.mkdtemp(prefix="zoo-"))
    build("llama", root / "warm-up")  # the tokenizer and first-call costs, outside the timings
    rows = []
    print("mlx: yes = mlx_lm.utils.load_model(path) as saved; cfg = loads only given the flat rope "
          "keys from rope_parameters as model_config (a diagnostic)")
    print("bits: max |log2-softmax difference| at the last of 16 tokens (fp32); top1: same argmax")
    print(f"{'type':18} built hf  mlx  bits     top1  build_s  MB    note")
    try:
        for t in types:
            row = check(t, root)
            if t in UNBUILDABLE:
                row["note"] = f"UNBUILDABLE: {UNBUILDABLE[t]} | {row['note']}"
            rows.append(row)
            yn = lambda v: {True: "yes", False: "no", "cfg": "cfg"}[v]  # noqa: E731
            bits = f"{row['bits']:.2e}" if row["bits"] is not None else "-"
            top1 = {None: "-", True: "yes", False: "NO"}[row["top1"]]
            secs = f"{row['secs']:.2f}" if row["secs"] is not None else "-"
            mb = f"{row['mb']:.2f}" if row.get("mb") is not None else "-"
            print(f"{t:18} {yn(row['built']):5} {yn(row['hf']):3} {yn(row['mlx']):4} "
                  f"{bits:8} {top1:5} {secs:7}  {mb:5} {row['note']}", flush=True)
            shutil.rmtree(root / t, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    both = [r for r in rows if r["hf"] and r["mlx"]]
    plain = [r for r in both if r["mlx"] is True]
    print(f"{len(types)} types; built {sum(r['built'] for r in rows)}; load in both "
          f"{len(both)} ({len(plain)} without a model_config override); "
          f"UNBUILDABLE {sum(t in UNBUILDABLE for t in types)}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or None)
