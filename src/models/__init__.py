from genlight.models.lm import from_pretrained, tiny_llama
from genlight.models.tokenizer import char_tokenizer, load_tokenizer

__all__ = ["char_tokenizer", "from_pretrained", "load_tokenizer", "tiny_llama"]
