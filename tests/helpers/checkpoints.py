"""Tiny non-Llama Hugging Face checkpoints, built here (no hub): Qwen2 and GPT-2 with a byte-level BPE
tokenizer (trained with `tokenizers` on arithmetic text) and a Qwen-style chat template, saved as ordinary
HF directories for `model=hf model.pretrained=DIR`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 / Qwen style), trained on arithmetic text; pad <|endoftext|>, eos <|im_end|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{a}+{b}={a + b}" for a in range(100) for b in range(0, 100, 7)] + ["user assistant system"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=CHATML, clean_up_tokenization_spaces=False)


def tiny_config(arch: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4):
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.eos_token_id)
    if arch == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=heads // 2, intermediate_size=4 * hidden,
                                             max_position_embeddings=256, tie_word_embeddings=True, **ids)
    if arch == "gpt2":
        return GPT2LMHeadModel, GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=heads, intermediate_size=4 * hidden,
                                             max_position_embeddings=256, **ids)
    raise ValueError(arch)


def tiny_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny `arch` (qwen2 | gpt2 | llama) causal LM and the BPE tokenizer in `path`."""
    import torch

    tok = bpe_tokenizer()
    cls, config = tiny_config(arch, tok)
    torch.manual_seed(seed)
    cls(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
