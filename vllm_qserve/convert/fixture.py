"""Tiny random Llama models written as QServe checkpoints: for tests, demos of the format, and bug reports.

The model is a real transformers `LlamaForCausalLM` (random weights), quantized with round-to-nearest and written
in the official zoo layout by `writer.write_checkpoint`, with a small byte-level BPE tokenizer trained on the spot
(no hub).  The fp weights are returned too, so a test can build an independent reference forward.
"""

from __future__ import annotations

import os

import torch

from vllm_qserve.convert.writer import write_checkpoint
from vllm_qserve.precision import Precision

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "QServe quantizes weights to four bits and activations to eight bits.",
    "Hello world! How are you today? I am fine, thank you.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(out_dir: str, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def tiny_llama_config(vocab_size: int, hidden_size: int = 256, intermediate_size: int = 512, layers: int = 2,
                      heads: int = 4, kv_heads: int = 2, bias: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden_size // heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, attention_bias=bias, mlp_bias=False,
                       initializer_range=0.06, bos_token_id=0, eos_token_id=1, torch_dtype="float16")


def make_fixture_checkpoint(out_dir: str, group_size: int = -1, weight_bits: int = 4, fmt: str = "safetensors",
                            zoo_style: bool = False, seed: int = 0, kv_bits: int = 16,
                            activation_sum: str | None = None, **config_kwargs):
    """Writes a tiny QServe checkpoint to out_dir; returns (out_dir, fp32 state dict, transformers config)."""
    from transformers import LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    config = tiny_llama_config(vocab_size=len(tok), **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # non-trivial norm gains, so that a loader that drops them is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    write_checkpoint(out_dir, state, cfg, Precision(weight_bits, kv_bits), group_size, fmt=fmt, zoo_style=zoo_style,
                     activation_sum=activation_sum)
    return out_dir, state, config


def tiny_gemma3_config(vocab_size: int, hidden_size: int = 256, intermediate_size: int = 512, layers: int = 4,
                       heads: int = 4, kv_heads: int = 2, head_dim: int = 256, sliding_window: int = 16):
    """Gemma 3 text in miniature: head_dim 256 (the real models' size), local (sliding-window) and global layers
    alternating, their two RoPE bases, QK-norm, sandwich norms, GeGLU, tied embeddings."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            head_dim=head_dim, max_position_embeddings=1024, sliding_window=sliding_window,
                            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(layers)],
                            query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            initializer_range=0.06, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def random_gemma3_state(config, seed: int = 0) -> dict:
    """fp32 state dict of a random Gemma3ForCausalLM with non-trivial (1 + w) norm gains."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).float()
    with torch.no_grad():  # Gemma norms multiply by (1 + w): w = 0 would hide a loader that drops or re-adds gains
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def make_gemma3_fixture_checkpoint(out_dir: str, group_size: int = -1, weight_bits: int = 4, kv_bits: int = 16,
                                   seed: int = 0, **config_kwargs):
    """A tiny random Gemma 3 text model as an RTN QServe checkpoint; returns (out_dir, fp32 state, config)."""
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    config = tiny_gemma3_config(vocab_size=len(tok), **config_kwargs)
    state = random_gemma3_state(config, seed)
    cfg = config.to_dict()
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    write_checkpoint(out_dir, state, cfg, Precision(weight_bits, kv_bits), group_size)
    return out_dir, state, config
