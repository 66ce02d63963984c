"""Tokenizers of exported looped models, for `transformers` (trust_remote_code).

Copied into a model directory that `looped export` writes when its task has no `tokenizers`
file: byte-level text (`LoopedByteTokenizer`, id = UTF-8 byte) and the built-in token tasks
(`LoopedTableTokenizer`, a table of token names, text = names separated by spaces).

Neither vocabulary has a token of its own for bos, eos or padding. The byte tokenizer uses the
NUL byte (id 0), which plain text does not contain; the table tokenizer uses the id named in its
tokenizer_config.json (`special_id`, 0 by default).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from transformers import PreTrainedTokenizer


class LoopedByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes: token i is the byte i, written as the character chr(i)."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, bos_token="\x00", eos_token="\x00", pad_token="\x00", **kwargs):
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token) if len(token) == 1 and ord(token) < 256 else 0

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(ord(t) for t in tokens).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        return ()  # the vocabulary is the 256 bytes: nothing to save


class LoopedTableTokenizer(PreTrainedTokenizer):
    """A fixed table of token names (tokens.json); text is names separated by spaces."""

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names = {"vocab_file": "tokens.json"}

    def __init__(self, vocab_file: str, special_id: int = 0, **kwargs):
        with open(vocab_file) as f:
            self.names: list[str] = json.load(f)
        self.ids = {n: i for i, n in enumerate(self.names)}
        self.special_id = special_id
        name = self.names[special_id]
        kwargs = {"bos_token": name, "eos_token": name, "pad_token": name, **kwargs}
        super().__init__(special_id=special_id, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.names)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.ids)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # whole names only: the generic splitting on special tokens would find "0" inside "10"
        return text.split()

    _tokenize = tokenize

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self.ids:
            raise ValueError(f"unknown token '{token}'; this task's tokens are "
                             f"{' '.join(self.names)}")
        return self.ids[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.names[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        path = os.path.join(save_directory, (filename_prefix or "") + "tokens.json")
        with open(path, "w") as f:
            json.dump(self.names, f)
        return (path,)
