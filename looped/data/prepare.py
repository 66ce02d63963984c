"""`looped data prepare`: tokenize a corpus once into memory-mapped shards (looped.data.shards).

Documents stream through: a file, a row or a record at a time, so preparing holds a batch of
documents and one shard's buffer, never the corpus. Each document goes to the held-out split
when its content hash, read as a fraction of 2^64, falls below `held_out`: one pass, linear
time, and identical documents land on the same side. Worker processes tokenize batches of
documents in order. After every `shard_tokens` training tokens both splits' open shards are
closed and meta.json records the documents consumed, so a killed run resumes from there (the
same command again) and writes the same shards a run without the kill would have.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from looped.data.shards import FORMAT, META_FILE, ShardWriter, read_meta, shard_name, token_dtype
from looped.data.text import (BUILDERS, SEPARATOR, SHAKESPEARE, _column, _first_line,
                              _looks_like_path, _quiet_datasets, local_files, shakespeare_plays)
from looped.data.tokenizers import (BPE, BYTE, TOKENIZER_FILE, BPETokenizer, ByteTokenizer,
                                    load_tokenizer_file, save_tokenizer)
from looped.errors import ConfigError

HASH_SPACE = float(1 << 64)
DOCS_PER_BATCH = 256  # documents a worker tokenizes at once


@dataclass
class PrepareArgs:
    corpus: str = ""  # shakespeare | a local file or directory (.txt .md .json .jsonl .csv .parquet) | a `datasets` dataset saved to disk (required)
    out: str = ""  # the directory to write (required; new, or an unfinished prepare to resume)
    tokenizer: str = BYTE  # byte | bpe (trained here once, saved) | a path to a tokenizer.json
    bpe_vocab: int = 1024  # BPE vocabulary size (tokenizer=bpe)
    bpe_train_chars: int = 200_000_000  # the BPE trains on the first this many training characters
    text_field: str = "text"  # the column of json/jsonl/csv/parquet rows and saved datasets
    held_out: float = 0.005  # expected fraction of documents held out (by content hash)
    shard_tokens: int = 100_000_000  # training tokens per shard (also the resume granularity)
    workers: int = 0  # tokenizing processes; 0: bytes in this process, a BPE one per core (<= 8)

    def check(self) -> None:
        if not self.corpus or not self.out:
            raise ConfigError("give the corpus and the output directory: looped data prepare "
                              "corpus=PATH out=DIR")
        if not 0 <= self.held_out < 1:
            raise ConfigError(f"held_out must be in [0, 1), got {self.held_out}")
        if self.tokenizer == BPE and self.bpe_vocab < 256:
            raise ConfigError(f"bpe_vocab must be >= 256 (the byte alphabet), got {self.bpe_vocab}")
        for name in ("bpe_train_chars", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")

    def recipe(self) -> dict:
        """What fixes the shards' content (a resume must be asked for the same)."""
        d = asdict(self)
        for name in ("out", "workers"):
            d.pop(name)
        return d


# ---------------------------------------------------------------------------------------------
# Documents, streamed


def _saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file()
                              or (path / "state.json").is_file())


def iter_documents(corpus: str, text_field: str = "text") -> Iterator[str]:
    """The corpus's non-empty documents in a fixed order, one at a time."""
    if corpus == SHAKESPEARE:
        yield from (d for d in shakespeare_plays() if d)
        return
    path = Path(corpus).expanduser()
    if not path.exists():
        hint = "no such file or directory" if _looks_like_path(corpus) else \
            "not a local path (preparing reads local files and saved datasets only)"
        raise ConfigError(f"corpus: {corpus}: {hint}")
    if _saved_dataset(path):
        yield from _saved_documents(path, text_field)
        return
    for f in local_files(path):
        if BUILDERS[f.suffix.lower()] == "text":  # one document per file, no `datasets` needed
            text = f.read_text(encoding="utf-8", errors="surrogateescape")
            if text:
                yield text
        else:
            yield from _rows(f, text_field)


def _saved_documents(path: Path, text_field: str) -> Iterator[str]:
    """A dataset written by `datasets`' save_to_disk (memory-mapped Arrow), its train split."""
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise ConfigError(f"corpus: cannot load the saved dataset {path}: "
                              f"{_first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"corpus: the saved dataset {path} has no 'train' split")
            ds = ds["train"]
        _column(ds.select(range(min(1, len(ds)))), text_field, str(path))  # checks the column
        for start in range(0, len(ds), DOCS_PER_BATCH):
            yield from (t for t in ds[start:start + DOCS_PER_BATCH][text_field] if t)


def _rows(f: Path, text_field: str) -> Iterator[str]:
    """The text column of a json/jsonl/csv/parquet file, streamed a row at a time."""
    with _quiet_datasets() as datasets:
        try:
            rows = datasets.load_dataset(BUILDERS[f.suffix.lower()], data_files=[str(f)],
                                         split="train", streaming=True)
            for row in rows:
                if text_field not in row:
                    raise ConfigError(f"corpus: {f} has no column '{text_field}' (text_field); "
                                      f"columns: {', '.join(row)}")
                if row[text_field]:
                    yield row[text_field]
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"corpus: cannot read {f}: {_first_line(e)}") from None


def held_out_doc(doc: str, held_out: float) -> bool:
    digest = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / HASH_SPACE < held_out


def corpus_bytes(corpus: str) -> Optional[int]:
    """The size of a local corpus on disk (the progress bar's total), None when unknown."""
    path = Path(corpus).expanduser()
    if corpus == SHAKESPEARE or not path.exists() or _saved_dataset(path):
        return None
    return sum(f.stat().st_size for f in local_files(path))


# ---------------------------------------------------------------------------------------------
# Tokenizing in worker processes

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER_TOKENIZER = load_tokenizer_file(tokenizer_path)


def _encode_batch(docs: list[str]) -> list[np.ndarray]:
    tok = _WORKER_TOKENIZER
    return [tok.encode(d + SEPARATOR).numpy() for d in docs]


def _batches(docs: Iterator[str], skip: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for i, d in enumerate(docs):
        if i < skip:
            continue
        batch.append(d)
        if len(batch) == DOCS_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# The run


def _tokenizer(args: PrepareArgs, out: Path):
    """The tokenizer, saved in out: loaded if an earlier (interrupted) prepare saved it."""
    path = out / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer_file(path)
    if args.tokenizer == BYTE:
        tok = ByteTokenizer()
    elif args.tokenizer == BPE:
        def training_text() -> Iterator[str]:
            left = args.bpe_train_chars
            for d in iter_documents(args.corpus, args.text_field):
                if left <= 0:
                    return
                if not held_out_doc(d, args.held_out):  # the held-out text stays unseen
                    yield d[:left]
                    left -= len(d)
        tok = BPETokenizer.train(training_text(), args.bpe_vocab)
    else:
        tok = load_tokenizer_file(args.tokenizer)
    save_tokenizer(tok, path)
    return tok


def _write_meta(out: Path, meta: dict) -> None:
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)


def _start(args: PrepareArgs, out: Path) -> dict:
    """meta.json of a new directory, or of the unfinished prepare found there."""
    if (out / META_FILE).is_file():
        meta = read_meta(out)
        if meta.get("recipe") != args.recipe():
            raise ConfigError(f"out: {out} was prepared with other settings "
                              f"({meta.get('recipe')}); use a new directory")
        return meta
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out: {out} exists and is not an unfinished `looped data prepare`; "
                          f"give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return {"format": FORMAT, "recipe": args.recipe(), "complete": False,
            "shards": {"train": [], "eval": []}, "tokens": {"train": 0, "eval": 0},
            "documents": {"total": 0, "eval": 0}, "bytes": 0, "seconds": 0.0}


def prepare(args: PrepareArgs, progress: bool = True) -> dict:
    """Prepare (or resume preparing) args.corpus into args.out; returns meta.json's content."""
    args.check()
    out = Path(args.out).expanduser()
    meta = _start(args, out)
    if meta["complete"]:
        return meta
    t0 = time.perf_counter() - meta["seconds"]
    tok = _tokenizer(args, out)
    fingerprint, dtype = tok.fingerprint(), token_dtype(tok.vocab_size)
    meta["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size,
                         "fingerprint": fingerprint, "dtype": dtype}
    for stale in out.glob("*.bin.tmp"):  # the open shards of an interrupted run
        stale.unlink()
    writers: dict[str, Optional[ShardWriter]] = {"train": None, "eval": None}
    pending = {"train": 0, "eval": 0, "documents": 0, "eval_documents": 0, "bytes": 0}

    def writer(split: str) -> ShardWriter:
        if writers[split] is None:
            name = shard_name(split, len(meta["shards"][split]))
            writers[split] = ShardWriter(out / name, split, dtype, fingerprint)
        return writers[split]

    def commit() -> None:
        """Close both open shards and record the documents they hold: a resume point."""
        for split, w in writers.items():
            if w is not None:
                meta["tokens"][split] += w.close()
                meta["shards"][split].append(w.path.name)
                writers[split] = None
        meta["documents"]["total"] += pending["documents"]
        meta["documents"]["eval"] += pending["eval_documents"]
        meta["bytes"] += pending["bytes"]
        meta["seconds"] = time.perf_counter() - t0
        pending.update(train=0, eval=0, documents=0, eval_documents=0, bytes=0)
        _write_meta(out, meta)

    # bytes encode at memory speed: worker processes would only add their start-up and pickling
    n_workers = args.workers or (1 if tok.kind == BYTE else min(os.cpu_count() or 1, 8))
    bar = tqdm(total=corpus_bytes(args.corpus), initial=meta["bytes"], unit="B",
               unit_scale=True, desc="prepare", disable=not progress or None)
    docs = iter_documents(args.corpus, args.text_field)
    batches = _batches(docs, skip=meta["documents"]["total"])
    ctx = multiprocessing.get_context("spawn")  # no forked copy of torch's threads
    pool = ctx.Pool(n_workers, _init_worker, (str(out / TOKENIZER_FILE),)) \
        if n_workers > 1 else None
    try:
        if pool is None:
            _init_worker(str(out / TOKENIZER_FILE))
            encoded = ((b, _encode_batch(b)) for b in batches)
        else:
            encoded = _zip_ordered(batches, pool, ahead=2 * n_workers)
        for docs_batch, ids_batch in encoded:
            for doc, ids in zip(docs_batch, ids_batch):
                split = "eval" if held_out_doc(doc, args.held_out) else "train"
                writer(split).write(ids)
                pending[split] += len(ids)
                pending["documents"] += 1
                pending["eval_documents"] += split == "eval"
                size = len(doc.encode("utf-8", "surrogatepass"))
                pending["bytes"] += size
                bar.update(size)
                if pending["train"] >= args.shard_tokens:
                    commit()
        commit()
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.abandon()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if meta["tokens"]["train"] == 0:
        raise ConfigError(f"corpus: {args.corpus} holds no training text")
    if args.held_out > 0 and meta["tokens"]["eval"] == 0:
        raise ConfigError(f"corpus: no document of {args.corpus} fell in the held-out split "
                          f"({meta['documents']['total']} documents, held_out={args.held_out}); "
                          f"raise held_out or use more documents")
    meta["complete"] = True
    _write_meta(out, meta)
    return meta


def _zip_ordered(batches: Iterator[list[str]], pool, ahead: int
                 ) -> Iterator[tuple[list[str], list]]:
    """(documents, their ids) in order, with the workers up to `ahead` batches ahead."""
    window: list = []
    for b in batches:
        window.append((b, pool.apply_async(_encode_batch, (b,))))
        if len(window) > ahead:
            docs, res = window.pop(0)
            yield docs, res.get()
    for docs, res in window:
        yield docs, res.get()
