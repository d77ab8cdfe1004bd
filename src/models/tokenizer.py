"""Tokenizers: a character-level one for the embedded default, or any local HF tokenizer.

The character tokenizer is built with `tokenizers` (a BPE model with an empty merge table, so every
character is a token) and wrapped as a `PreTrainedTokenizerFast`: it saves and loads like any HF
tokenizer (`AutoTokenizer.from_pretrained`), so exported checkpoints are ordinary HF directories.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]

# Printable ASCII (digits, letters, punctuation, space) plus newline and tab.
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n\t"

# A minimal chat template, so `{"messages": [...]}` data works with the character tokenizer too. It supports tools
# (multi-turn RL, src/envs/): a compact `<|tools|>name(arg,...)` line from their JSON schemas, assistant tool calls in
# the Hermes convention (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, what src/envs/tools.py parses)
# and `<|tool|>` result turns. An assistant turn ends with </s>, as the policy ends it when it samples.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|tools|>{% for t in tools %}{% set f = t.function if t.function is defined else t %}"
    "{{ f.name }}({{ f.parameters.properties | join(',') }}){% if not loop.last %} {% endif %}{% endfor %}{{ '\\n' }}"
    "{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
    "{% for c in (m.tool_calls or []) %}{% set f = c.function if c.function is defined else c %}"
    '<tool_call>{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}</tool_call>{% endfor %}'
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


_MARK = "\u2063assistant-turn\u2063"


def after_assistant_turn(tokenizer, following: list[dict], add_generation_prompt: bool,
                         template: str | None = None) -> str | None:
    """The text a chat template writes after an assistant turn's content: its end of turn, then the `following`
    messages and the generation prompt if asked (rendered after a placeholder turn); None when the template does not
    render an assistant's content."""
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}]
    text = tokenizer.apply_chat_template(base + following, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template or tokenizer.chat_template or CHAT_TEMPLATE)
    cut = text.find(_MARK)
    return None if cut < 0 else text[cut + len(_MARK):]


def char_tokenizer(alphabet: str | None = None, words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ids 0-3 are <pad> <s> </s> <unk>, then one id per character, then one per string of
    `words`: strings held as single tokens, matched whole before the characters (as a BPE vocabulary holds frequent
    words; a game preset's tool-call markup and replies, conf/experiment/guess_the_number.yaml).

    `tokenizer(text)` prepends <s> (like Llama's); unknown characters map to <unk>.
    """
    chars = list(dict.fromkeys(alphabet or DEFAULT_ALPHABET))  # unique, order kept
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if words:
        bad = [w for w in words if not isinstance(w, str) or not w]
        if bad:
            raise ValueError(f"model.tokenizer.words: each must be a non-empty string, not {bad[0]!r}")
        out.add_tokens(list(dict.fromkeys(words)))
    return out


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A tokenizer saved with `save_pretrained` in a local directory (never the hub)."""
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok
