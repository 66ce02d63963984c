"""Tokenizers of the text task: UTF-8 bytes, or a byte-level BPE (the `tokenizers` package).

A BPE is trained once and saved as `tokenizer.json` (the `tokenizers` format, which transformers
also reads). Three ways to get one, none of which retrains what was trained before:
  * `looped data prepare` trains it on the prepared corpus and saves it beside the shards;
  * `task.tokenizer=PATH/tokenizer.json` uses a given one;
  * `task.tokenizer=bpe` on the in-memory path trains it on the training text the first time and
    keeps it in the tokenizer cache (`$LOOPED_CACHE`, default ~/.cache/looped/tokenizers), keyed
    by a hash of that text and the vocabulary size, so `looped eval`, `export` and `generate`
    load the tokenizer the run trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from looped.errors import ConfigError

BYTE, BPE = "byte", "bpe"
TOKENIZER_FILE = "tokenizer.json"
CACHE_ENV = "LOOPED_CACHE"
CHUNK_CHARS = 1 << 16  # pieces of text the BPE encodes in parallel


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """text cut after newlines into pieces of about `size` characters (for parallel encoding)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


class ByteTokenizer:
    kind = BYTE
    vocab_size = 256
    dtype = torch.uint8

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8", "surrogatepass")
        if not data:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, ids) -> str:
        return bytes(torch.as_tensor(ids).to(torch.uint8).tolist()).decode("utf-8", "replace")

    def token_bytes(self) -> torch.Tensor:
        return torch.ones(self.vocab_size, dtype=torch.long)

    def to_json(self) -> str:
        return json.dumps({"looped_tokenizer": BYTE})

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _tokenizers_package():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("a BPE tokenizer needs the PyPI package tokenizers: "
                          "pip install tokenizers") from None
    return tokenizers


class BPETokenizer:
    """A byte-level BPE (a `tokenizers.Tokenizer`); ids < vocab_size."""

    kind = BPE

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.dtype = torch.int32

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        """Trained on an iterable of strings (pieces of the training text)."""
        tk = _tokenizers_package()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         special_tokens=[])
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: Path | str) -> "BPETokenizer":
        tk = _tokenizers_package()
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot read the tokenizer {path}: {first}") from None

    def encode(self, text: str) -> torch.Tensor:
        ids = [i for enc in self.tok.encode_batch(chunks(text), add_special_tokens=False)
               for i in enc.ids]
        return torch.tensor(ids, dtype=torch.int32)

    def decode(self, ids) -> str:
        return self.tok.decode(torch.as_tensor(ids).tolist())

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes per token id: a byte-level token's string has one char per byte."""
        out = torch.zeros(self.vocab_size, dtype=torch.long)
        for piece, i in self.tok.get_vocab().items():
            out[i] = len(piece)
        return out

    def to_json(self) -> str:
        return self.tok.to_str()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def save_tokenizer(tokenizer, path: Path) -> Path:
    """Write tokenizer.json atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(tokenizer.to_json())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep it from the other users of a corpus
    os.replace(tmp, path)
    return path


def load_tokenizer_file(path: Path | str):
    """A tokenizer.json written by save_tokenizer, or any `tokenizers` file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"no tokenizer file {path}")
    try:
        head = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the tokenizer {path}: {type(e).__name__}") from None
    if isinstance(head, dict) and head.get("looped_tokenizer") == BYTE:
        return ByteTokenizer()
    return BPETokenizer.from_file(path)


def cache_root() -> Path:
    """Where looped keeps what it can recompute: `$LOOPED_CACHE`, default ~/.cache/looped."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "looped")


def cache_dir() -> Path:
    return cache_root() / "tokenizers"


def trained_bpe(train_text: str, vocab_size: int) -> BPETokenizer:
    """The BPE of train_text: from the tokenizer cache when this text and vocabulary were
    trained before (in any process), else trained now and cached."""
    digest = hashlib.sha256(train_text.encode("utf-8", "surrogatepass"))
    digest.update(f"|bpe|{vocab_size}".encode())
    path = cache_dir() / f"bpe-{digest.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            return BPETokenizer.from_file(path)
        except ConfigError:
            pass  # a damaged cache entry is retrained and rewritten
    tok = BPETokenizer.train(chunks(train_text), vocab_size)
    try:
        save_tokenizer(tok, path)
    except OSError:
        pass  # a read-only home only costs the retraining next time
    return tok
