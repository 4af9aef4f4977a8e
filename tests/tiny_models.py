"""Tiny random Hugging Face causal LMs (plus a tiny BPE tokenizer) for offline tests.

Each model is built from scratch in well under a second and saved as a normal `save_pretrained`
folder (config.json + model.safetensors + tokenizer), so the same folder can be loaded by
transformers and by mlx-lm. All weights are redrawn with a large std and norm scales away from 1,
so outputs are peaked and a lens that uses the wrong norm, head or soft-cap gives visibly
different numbers.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mlx_lens.loading.quiet import quiet_library_bars

BOS, EOS = "<|bos|>", "<|eos|>"
VOCAB_SIZE = 512
INIT_STD = 0.2
EMBED_STD = 0.5

# The prompt of the original experiment, repeated so BPE merges " Berlin" and " Paris" into single
# tokens, plus enough varied English to fill a 512-token vocabulary.
_CAPITALS = """\
Give the city name only, plain text. The capital of Germany is called simply Berlin.
Give the city name only, plain text. The capital of France is called simply Paris.
The capital of Germany is named Berlin. The capital of France is named Paris.
Berlin is the capital city of Germany. Paris is the capital city of France.
What is the capital of Germany? It is Berlin. What is the capital of France? It is Paris."""
_TEXT = """\
The city of Berlin lies on the river Spree, and the city of Paris lies on the river Seine.
Both cities are large, old and busy, with many museums, parks, bridges and small cafes.
In the morning the streets fill with people who walk to work, ride bicycles or take the train.
A good answer is short and clear: it names the place and says nothing more than is needed.
Questions about maps, countries and languages are common in school and children learn them.
Spain has Madrid, Italy has Rome, Austria has Vienna, Poland has Warsaw and Japan has Tokyo.
When the weather is warm we sit outside, drink coffee, read a book and watch the world go by.
The teacher wrote a simple question on the board and waited quietly for the students to reply.
Numbers such as one, two, three, four, five, six, seven, eight, nine and ten are easy to count.
She opened the window, looked at the sky and said that it would probably rain before evening.
Every language has its own words for home, family, friend, water, bread, light and time.
He thought about the long journey north, the cold mountains, the deep forests and the quiet lakes.
Write your reply in plain text, without lists or extra words, and keep it to a single line.
The market sells fresh fruit, vegetables, cheese, fish and flowers every Saturday morning.
History tells us how kingdoms grew, how wars ended and how people built new lives after them."""
_CORPUS = _CAPITALS.splitlines() * 30 + _TEXT.splitlines() * 5

# Shared shape: hidden 96, 3 layers, 4 query heads of dim 24, 2 kv heads (GQA), MLP 192.
# The widths make every derived constant inexact in bf16 (sqrt(96) = 9.798 rounds to 9.8125,
# 24^-0.5 too), so a backend that rounds one through bf16 where the model does not is caught;
# they are multiples of 32, the group size of MLX's 4-bit quantisation.
_BASE = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
             max_position_embeddings=128)
_GQA = dict(num_key_value_heads=2, head_dim=24)

# name -> config kwargs (`model_type` picks the transformers config/model class).
CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", **_BASE, **_GQA, tie_word_embeddings=True),
    "llama_untied": dict(model_type="llama", **_BASE, **_GQA, tie_word_embeddings=False),
    "llama_rope5e5": dict(model_type="llama", **_BASE, **_GQA, tie_word_embeddings=False,
                          rope_parameters=dict(rope_type="default", rope_theta=5e5)),
    # With head_dim 24 and theta 1e4 the 12 RoPE wavelengths span 6..3.3e4 positions; an
    # original context of 64 keeps the first two, blends the next two and divides the other 8 by 8.
    "llama3_scaling": dict(model_type="llama", **_BASE, **_GQA, tie_word_embeddings=False,
                           rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0,
                                                low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=64)),
    "mistral": dict(model_type="mistral", **_BASE, **_GQA, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", **_BASE, **_GQA, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", **_BASE, **_GQA, tie_word_embeddings=True),
    # Raw logits here span about +-12: a final soft-cap of 9.7 bends the top ones yet leaves the
    # distribution peaked. The attention cap bites too (raw scores reach ~35). Caps and the
    # query scale (query_pre_attn_scalar 24: 24^-0.5) are inexact in bf16, like sqrt(96).
    # The window (64) is longer than any test prompt: mlx-lm's gemma2 applies none, so its
    # forward is a reference here; gemma2_sliding is the one where the windows act.
    "gemma2": dict(model_type="gemma2", **_BASE, **_GQA, tie_word_embeddings=True,
                   query_pre_attn_scalar=24, final_logit_softcapping=9.7,
                   attn_logit_softcapping=12.3, sliding_window=64),
    # Blocks 0 and 2 slide over 4 tokens (transformers' default alternation); mlx-lm's own
    # forward ignores the windows, the lens must not. The file leaves out layer_types, as the
    # published Gemma-2 configs do, so the alternation is transformers' default.
    "gemma2_sliding": dict(model_type="gemma2", **_BASE, **_GQA, tie_word_embeddings=True,
                           query_pre_attn_scalar=24, final_logit_softcapping=9.7,
                           attn_logit_softcapping=12.3, sliding_window=4),
    # Layers: sliding, sliding, full (Gemma 3 uses 5 sliding : 1 full). Given as the Hub-style
    # sliding_window_pattern, which transformers turns into layer_types and mlx-lm reads as is
    # (mlx-lm ignores layer_types; its default pattern 6 breaks a 3-layer model).
    "gemma3_text": dict(model_type="gemma3_text", **_BASE, **_GQA, tie_word_embeddings=True,
                        query_pre_attn_scalar=24, sliding_window=64, sliding_window_pattern=3),
    # A window shorter than the test prompts, so that the sliding-window masks really act.
    "gemma3_sliding": dict(model_type="gemma3_text", **_BASE, **_GQA, tie_word_embeddings=True,
                           query_pre_attn_scalar=24, sliding_window=4, sliding_window_pattern=3),
    "phi3": dict(model_type="phi3", **_BASE, num_key_value_heads=2, tie_word_embeddings=False),
    # gpt2 and gpt_neox: MLP width 4 * hidden, the width mlx-lm hard-codes for both.
    "gpt2": dict(model_type="gpt2", n_embd=96, n_layer=3, n_head=4, n_inner=384, n_positions=128,
                 tie_word_embeddings=True),
    "gpt_neox": dict(model_type="gpt_neox", **{**_BASE, "intermediate_size": 384},
                     tie_word_embeddings=False),
}


# Configs written as the published checkpoints have them, without transformers 5's layer_types.
WITHOUT_LAYER_TYPES = {"gemma2_sliding"}


# Models whose mlx-lm forward is not the checkpoint's semantics: there the MLX lens is held to
# transformers (parity_tests/test_parity.py), not to mlx-lm's own logits.
MLX_LM_DIFFERS = {"gemma2_sliding": "mlx-lm's gemma2 applies no sliding window"}


def framework_cases(backends) -> list[tuple[str, str]]:
    """(backend, model) pairs whose framework forward is the reference for the lens's last row."""
    return [(kind, name) for kind in backends for name in sorted(CONFIGS)
            if not (kind == "mlx" and name in MLX_LM_DIFFERS)]


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a 512-token byte-level BPE that prepends BOS like Llama's tokenizer, and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(out_dir)
    return fast


def _randomize(model: torch.nn.Module) -> None:
    """Redraw every parameter so outputs are peaked and every norm is distinguishable."""
    # A wider (un)embedding spreads logits over several nats, so lens distributions are peaked.
    # Gemma multiplies input embeddings by sqrt(hidden) = 8: a wide tied embedding would swamp the
    # residual and the model would just echo its input token, so Gemma keeps INIT_STD.
    gemma = model.config.model_type.startswith("gemma")
    vocab = (model.get_input_embeddings(), model.get_output_embeddings())
    vocab_mats = {id(m.weight) for m in vocab}
    with torch.no_grad():
        for module in model.modules():
            # Norm weights ~ N(1, 0.2) everywhere. Gemma's RMSNorm scales by (1 + weight), so its
            # scales come out near 2, which also lifts its blocks above the scaled embedding.
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                std = EMBED_STD if id(p) in vocab_mats and not gemma else INIT_STD
                p.normal_(1.0 if is_norm and name == "weight" else 0.0, std)


# A real vocabulary size (Qwen2's padded 151,936) on the tiny llama body, for the numerics of
# long vocabulary sums: the tokenizer keeps its 512 tokens and the head decodes all 151,936 ids,
# as padded real vocabularies do.
LARGE_VOCAB = 151_936


def build_model(name: str, out_dir: Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Build the tiny `name` model with random weights; save it and the tokenizer to out_dir."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    kwargs = dict(CONFIGS[name])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs,
                                  vocab_size=vocab_size or len(tok),
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=None, dtype="float32")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model)  # a tied head is the same Parameter as the embedding, so both change
    quiet_library_bars()  # no shard-writing bar in the test log
    model.save_pretrained(out_dir)
    if name in WITHOUT_LAYER_TYPES:
        path = out_dir / "config.json"
        saved = json.loads(path.read_text())
        del saved["layer_types"]
        path.write_text(json.dumps(saved, indent=2))
    return out_dir


def build_all(root: Path) -> dict[str, Path]:
    """Build every model in CONFIGS into root/<name>."""
    return {name: build_model(name, Path(root) / name) for name in CONFIGS}


def corpus_file(out_dir: Path) -> Path:
    """A text corpus in the tiny tokenizer's language (its training text), for tuned lenses."""
    path = Path(out_dir) / "corpus.txt"
    path.write_text("\n".join(_CORPUS) + "\n", encoding="utf-8")
    return path
