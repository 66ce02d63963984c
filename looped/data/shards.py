"""Memory-mapped token shards: what `looped data prepare` writes and `task.data=DIR` reads.

A prepared directory holds
  * meta.json: the format version, the tokenizer's kind, fingerprint and vocabulary, each
    split's shards with their token counts, and how far preparation got (`complete`, and the
    documents consumed at the last committed shard, from which a rerun resumes);
  * tokenizer.json: the tokenizer (see looped.data.tokenizers), loaded, never retrained;
  * train_NNNNNN.bin, eval_NNNNNN.bin: one header of HEADER_BYTES (MAGIC, then a JSON object:
    dtype, count, split, tokenizer fingerprint; zero-padded), then `count` token ids, native
    little-endian, back to back. Documents end with the separator's tokens.

Reading opens each shard as a numpy memmap, so the memory a reader holds does not grow with the
corpus: only the pages of the windows it reads come in, and the OS may drop them again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch

from looped.data.tokenizers import TOKENIZER_FILE, load_tokenizer_file
from looped.errors import ConfigError

FORMAT = 1
MAGIC = b"LOOPTOK\x01"
HEADER_BYTES = 4096  # keeps the tokens page-aligned
META_FILE = "meta.json"
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every id."""
    return "uint8" if vocab_size <= 1 << 8 else "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Appends token arrays to one shard; the header's count is written at close, and the file
    appears under its name only then (a killed writer leaves only a .tmp file)."""

    def __init__(self, path: Path, split: str, dtype: str, fingerprint: str):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.header = {"dtype": dtype, "split": split, "tokenizer": fingerprint, "count": 0}
        self.np_dtype = DTYPES[dtype]
        self.f = open(self.tmp, "wb")
        self.f.write(bytes(HEADER_BYTES))

    def write(self, ids: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(ids, dtype=self.np_dtype).tobytes())
        self.header["count"] += len(ids)

    def close(self) -> int:
        blob = MAGIC + json.dumps(self.header).encode()
        assert len(blob) <= HEADER_BYTES, "shard header too long"
        self.f.seek(0)
        self.f.write(blob)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.header["count"]

    def abandon(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read the shard {path}: {e.strerror}") from None
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise ConfigError(f"{path} is not a looped token shard (no header); rerun "
                          f"`looped data prepare`")
    try:
        return json.loads(head[len(MAGIC):].rstrip(b"\0"))
    except ValueError:
        raise ConfigError(f"{path}: its shard header is damaged; rerun `looped data prepare`") \
            from None


def open_shard(path: Path, fingerprint: str) -> np.memmap:
    header = read_header(path)
    if header.get("tokenizer") != fingerprint:
        raise ConfigError(f"{path} was written with another tokenizer than the directory's "
                          f"{TOKENIZER_FILE}; rerun `looped data prepare` into a new directory")
    dtype = DTYPES.get(header.get("dtype"))
    count = header.get("count")
    if dtype is None or not isinstance(count, int):
        raise ConfigError(f"{path}: its shard header is damaged; rerun `looped data prepare`")
    expected = HEADER_BYTES + count * np.dtype(dtype).itemsize
    if path.stat().st_size != expected:
        raise ConfigError(f"{path} holds {path.stat().st_size} bytes, its header promises "
                          f"{expected}: the file is truncated or damaged")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def read_meta(data: Path) -> dict:
    path = data / META_FILE
    if not data.is_dir():
        raise ConfigError(f"task.data: {data} is not a directory (make one with `looped data "
                          f"prepare corpus=... out={data}`)")
    if not path.is_file():
        raise ConfigError(f"task.data: {data} holds no {META_FILE}; it is not a prepared corpus "
                          f"(`looped data prepare corpus=... out={data}`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"task.data: cannot read {path}: {type(e).__name__}") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"task.data: {data} has format {meta.get('format')}, this version "
                          f"reads {FORMAT}; prepare it again")
    return meta


class ShardStream:
    """One split's shards as one sampler of windows; a window never crosses a shard's end."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.counts = torch.tensor([len(s) for s in shards], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def _place(self, flat: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat start indices over the valid starts of all shards -> (shard, offset)."""
        valid = (self.counts - seq_len).clamp_min(0)
        ends = valid.cumsum(0)
        shard = torch.searchsorted(ends, flat, right=True)
        return shard, flat - (ends[shard] - valid[shard])

    def n_starts(self, seq_len: int) -> int:
        return int((self.counts - seq_len).clamp_min(0).sum())

    def windows(self, shard: torch.Tensor, offset: torch.Tensor, seq_len: int) -> torch.Tensor:
        rows = [torch.from_numpy(np.asarray(self.shards[s][o:o + seq_len + 1], dtype=np.int64))
                for s, o in zip(shard.tolist(), offset.tolist())]
        return torch.stack(rows) if rows else torch.empty(0, seq_len + 1, dtype=torch.long)

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """(B, seq_len + 1) windows, uniform over every start a window fits at."""
        flat = torch.randint(0, self.n_starts(seq_len), (batch_size,), generator=generator)
        return self.windows(*self._place(flat, seq_len), seq_len)

    def sequential(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard, offset) of back-to-back windows, stride seq_len, in each shard."""
        shard, offset = [], []
        for i, n in enumerate(self.counts.tolist()):
            starts = torch.arange(0, max(n - seq_len, 0), seq_len)
            shard.append(torch.full_like(starts, i))
            offset.append(starts)
        return torch.cat(shard), torch.cat(offset)


@dataclass
class PreparedCorpus:
    directory: Path
    meta: dict
    tokenizer: object
    train: ShardStream
    held_out: ShardStream


def open_prepared(data: str, min_tokens: int = 2) -> PreparedCorpus:
    """The shards of a prepared directory; both splits must hold a window of min_tokens."""
    directory = Path(data).expanduser()
    meta = read_meta(directory)
    if not meta.get("complete"):
        raise ConfigError(f"task.data: preparing {directory} did not finish; rerun the same "
                          f"`looped data prepare` command to resume it")
    tokenizer = load_tokenizer_file(directory / TOKENIZER_FILE)
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise ConfigError(f"task.data: {directory / TOKENIZER_FILE} is not the tokenizer the "
                          f"shards were written with; prepare the corpus again")
    streams = {}
    for split in ("train", "eval"):
        shards = [open_shard(directory / name, meta["tokenizer"]["fingerprint"])
                  for name in meta["shards"][split]]
        stream = ShardStream(shards)
        if stream.n_starts(min_tokens - 1) == 0:
            raise ConfigError(f"task.data: the {split} split of {directory} has no shard of "
                              f"task.seq_len + 1 = {min_tokens} tokens; use more text, a larger "
                              f"held_out, or a shorter task.seq_len")
        streams[split] = stream
    return PreparedCorpus(directory, meta, tokenizer, streams["train"], streams["eval"])


def corpus_summary(data: str) -> str:
    meta = read_meta(Path(data).expanduser())
    tok = meta["tokenizer"]
    status = "complete" if meta.get("complete") else "incomplete (rerun prepare to resume)"
    return (f"{data}: {status}; tokenizer {tok['kind']} (vocab {tok['vocab_size']}, "
            f"{tok['fingerprint'][:12]}); train {meta['tokens']['train']:,} tokens in "
            f"{len(meta['shards']['train'])} shard(s), eval {meta['tokens']['eval']:,} in "
            f"{len(meta['shards']['eval'])}; {meta['documents']['total']:,} documents "
            f"({meta['documents']['eval']:,} held out)")
