"""A word-level tokenizer (the ``tokenizers`` library) for the bundled shapes-world model.

Saved as a standard ``tokenizer.json`` and loaded as a transformers ``PreTrainedTokenizerFast``,
so the sampler treats it exactly like CLIP's tokenizer: padded to ``model_max_length`` with a start
and an end token around the words.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


def build_word_tokenizer(vocabulary: tuple[str, ...], max_length: int) -> PreTrainedTokenizerFast:
    """A lower-casing whitespace word tokenizer: ids 0–3 are the special tokens, then the words."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *vocabulary))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
    )
