"""`looped data prepare` and `task.data=DIR`: shards hold exactly the corpus's documents, split by
content hash; an interrupted prepare resumes to the same bytes; the reader samples windows of the
shards; the saved tokenizer is loaded, never retrained; bad input is one line."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from looped.data import prepare as P
from looped.data import shards as S
from looped.data import text as T
from looped.data import tokenizers as TK
from looped.errors import ConfigError
from looped.tools import cli

WORDS = ("the quick brown fox jumps over lazy dogs while seven wizards quietly hex "
         "a jovial knight who sings of wine and bread").split()


def random_docs(n: int, seed: int, lo: int = 5, hi: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + f" #{i}"
            for i in range(n)]


def write_txt_corpus(root, docs):
    root.mkdir()
    for i, d in enumerate(docs):
        (root / f"doc{i:05d}.txt").write_text(d)
    return root


def stream_docs(stream: S.ShardStream) -> list[str]:
    """The documents of a split, read back from its shards (byte tokenizer)."""
    data = b"".join(np.asarray(s).tobytes() for s in stream.shards).decode()
    assert data.endswith(T.SEPARATOR)
    return data[:-len(T.SEPARATOR)].split(T.SEPARATOR)


def test_shards_hold_each_document_once_split_by_its_hash(tmp_path):
    docs = random_docs(400, seed=1)
    corpus = write_txt_corpus(tmp_path / "c", docs)
    meta = P.prepare(P.PrepareArgs(corpus=str(corpus), out=str(tmp_path / "d"), held_out=0.2,
                                   shard_tokens=3000, workers=1), progress=False)
    prepared = S.open_prepared(str(tmp_path / "d"))
    train, held = stream_docs(prepared.train), stream_docs(prepared.held_out)
    # an independent rule: blake2b's first 8 bytes, little-endian, below held_out * 2^64
    import hashlib

    def is_held(d):
        return int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(),
                              "little") < 0.2 * 2 ** 64
    files = sorted(corpus.iterdir())  # the order the corpus is read in
    ordered = [f.read_text() for f in files]
    assert held == [d for d in ordered if is_held(d)]
    assert train == [d for d in ordered if not is_held(d)]
    assert 40 < len(held) < 120  # about 80 of 400
    assert meta["documents"] == {"total": 400, "eval": len(held)}
    assert len(meta["shards"]["train"]) > 3  # shard_tokens=3000 cut it into several
    assert meta["tokens"]["train"] == sum(len(d) + 2 for d in train)
    for name in meta["shards"]["train"]:
        header = S.read_header(tmp_path / "d" / name)
        assert header["dtype"] == "uint8" and header["tokenizer"] == meta["tokenizer"]["fingerprint"]


def test_jsonl_parquet_and_a_saved_dataset_give_the_same_shards(tmp_path):
    import datasets

    docs = random_docs(120, seed=2)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    ds = datasets.Dataset.from_dict({"body": docs})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    bins = []
    for i, corpus in enumerate(("c.jsonl", "c.parquet", "saved")):
        out = tmp_path / f"out{i}"
        P.prepare(P.PrepareArgs(corpus=str(tmp_path / corpus), out=str(out), held_out=0.1,
                                text_field="body", workers=1), progress=False)
        bins.append([(out / n).read_bytes() for n in sorted(p.name for p in out.glob("*.bin"))])
        assert sorted(stream_docs(S.open_prepared(str(out)).train)
                      + stream_docs(S.open_prepared(str(out)).held_out)) == sorted(docs)
    assert bins[0] == bins[1] == bins[2]


def test_worker_processes_write_what_one_process_writes(tmp_path):
    corpus = write_txt_corpus(tmp_path / "c", random_docs(600, seed=3))
    for workers in (1, 2):
        P.prepare(P.PrepareArgs(corpus=str(corpus), out=str(tmp_path / f"w{workers}"),
                                held_out=0.1, shard_tokens=5000, workers=workers), progress=False)
    names = sorted(p.name for p in (tmp_path / "w1").glob("*.bin"))
    assert names == sorted(p.name for p in (tmp_path / "w2").glob("*.bin"))
    for n in names:
        assert (tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes()


def test_an_interrupted_prepare_resumes_to_the_same_shards(tmp_path, monkeypatch):
    corpus = write_txt_corpus(tmp_path / "c", random_docs(500, seed=4))
    args = dict(corpus=str(corpus), held_out=0.1, shard_tokens=4000, workers=1)
    P.prepare(P.PrepareArgs(out=str(tmp_path / "whole"), **args), progress=False)

    real = P.iter_documents

    def dies_after(n):
        def docs(*a, **k):
            for i, d in enumerate(real(*a, **k)):
                if i == n:
                    raise KeyboardInterrupt  # what a Ctrl-C or a kill between documents leaves
                yield d
        return docs

    monkeypatch.setattr(P, "iter_documents", dies_after(300))
    with pytest.raises(KeyboardInterrupt):
        P.prepare(P.PrepareArgs(out=str(tmp_path / "cut"), **args), progress=False)
    meta = json.loads((tmp_path / "cut" / S.META_FILE).read_text())
    assert not meta["complete"] and 0 < meta["documents"]["total"] < 300
    assert not list((tmp_path / "cut").glob("*.tmp"))  # the open shards were dropped
    with pytest.raises(ConfigError, match="did not finish"):
        S.open_prepared(str(tmp_path / "cut"))
    monkeypatch.setattr(P, "iter_documents", real)
    P.prepare(P.PrepareArgs(out=str(tmp_path / "cut"), **args), progress=False)
    whole = sorted(p.name for p in (tmp_path / "whole").glob("*.bin"))
    assert whole == sorted(p.name for p in (tmp_path / "cut").glob("*.bin"))
    for n in whole:
        assert (tmp_path / "whole" / n).read_bytes() == (tmp_path / "cut" / n).read_bytes()
    cut = json.loads((tmp_path / "cut" / S.META_FILE).read_text())
    full = json.loads((tmp_path / "whole" / S.META_FILE).read_text())
    for key in ("shards", "tokens", "documents", "bytes"):
        assert cut[key] == full[key]


def test_the_reader_samples_windows_of_the_shards(tmp_path):
    corpus = write_txt_corpus(tmp_path / "c", random_docs(300, seed=5))
    P.prepare(P.PrepareArgs(corpus=str(corpus), out=str(tmp_path / "d"), held_out=0.2,
                            shard_tokens=2000, workers=1), progress=False)
    task = T.TextTask(data=str(tmp_path / "d"), seq_len=16)
    stream = task.streams["train"]
    batch = task.sample(64, torch.Generator().manual_seed(0))
    again = task.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(batch.inputs, again.inputs)  # a function of the generator's seed
    assert batch.inputs.shape == (64, 16) and torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    # every window is a contiguous piece of one shard
    texts = [np.asarray(s).tobytes() for s in stream.shards]
    for row, tgt in zip(batch.inputs, batch.targets):
        piece = bytes(row.tolist()) + bytes(tgt[-1:].tolist())
        assert any(piece in t for t in texts)
    # held-out windows back to back over each eval shard, every shard's tokens scored once
    held = task.streams["eval"]
    n = sum(len(w.targets.flatten()) for w in task.held_out_batches(8))
    assert n == sum((c - 1) // 16 * 16 for c in held.counts.tolist())
    ev = T.TextTask(data=str(tmp_path / "d"), seq_len=16, split="eval")
    assert ev.sample(4, torch.Generator().manual_seed(1)).inputs.max() < 256


def test_place_maps_flat_starts_to_shards_without_crossing_an_end():
    stream = S.ShardStream([torch.arange(10), torch.arange(3), torch.arange(7)])
    shard, offset = stream._place(torch.arange(stream.n_starts(4)), 4)
    # valid starts: 10 - 4 = 6 in shard 0, none in shard 1 (3 tokens), 7 - 4 = 3 in shard 2
    assert shard.tolist() == [0] * 6 + [2] * 3
    assert offset.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]


def test_the_document_split_is_linear_in_the_number_of_documents():
    """Catches the quadratic split (`hashes.count(h)` for each chosen hash) that 100k documents
    made take minutes: 10x the documents must take well under 100x the time."""
    def best_time(n):
        docs = random_docs(n, seed=6, lo=1, hi=3)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            T.split_documents(docs, 0.05)
            best = min(best, time.perf_counter() - t0)
        return best
    small, large = best_time(10_000), best_time(100_000)
    assert large / small < 40, (small, large)


def test_bpe_is_trained_once_and_loaded_after(tmp_path, monkeypatch):
    corpus = write_txt_corpus(tmp_path / "c", random_docs(200, seed=7))
    P.prepare(P.PrepareArgs(corpus=str(corpus), out=str(tmp_path / "d"), tokenizer="bpe",
                            bpe_vocab=300, held_out=0.1, workers=1), progress=False)
    saved = TK.load_tokenizer_file(tmp_path / "d" / TK.TOKENIZER_FILE)

    def no_training(*a, **k):
        raise AssertionError("a BPE was trained again")
    monkeypatch.setattr(TK.BPETokenizer, "train", no_training)
    task = T.TextTask(data=str(tmp_path / "d"), seq_len=16, split="eval")
    assert task.vocab_size == 300 and task.tokenizer.fingerprint() == saved.fingerprint()
    assert S.open_prepared(str(tmp_path / "d")).meta["tokenizer"]["dtype"] == "uint16"
    text = "the quick brown fox"
    assert task.decode(task.encode(text)) == text
    # a given tokenizer.json, on the in-memory path
    given = T.TextTask(corpus=str(corpus), seq_len=16, tokenizer=str(tmp_path / "d" / "tokenizer.json"))
    assert given.tokenizer.fingerprint() == saved.fingerprint()


def test_the_in_memory_bpe_comes_from_the_cache_in_a_later_process(tmp_path, monkeypatch):
    monkeypatch.setenv(TK.CACHE_ENV, str(tmp_path / "cache"))
    corpus = write_txt_corpus(tmp_path / "c", random_docs(100, seed=8))
    first = T.TextTask(corpus=str(corpus), seq_len=16, tokenizer="bpe", bpe_vocab=280)
    T._CACHE.clear()  # what a new process (looped eval, export, generate) starts with
    monkeypatch.setattr(TK.BPETokenizer, "train", lambda *a, **k: pytest.fail("retrained"))
    second = T.TextTask(corpus=str(corpus), seq_len=16, tokenizer="bpe", bpe_vocab=280,
                        split="eval")
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert torch.equal(second.held_out_tokens, first.held_out_tokens)


def test_eval_and_export_of_a_run_on_shards_load_the_saved_tokenizer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    corpus = write_txt_corpus(tmp_path / "c", random_docs(150, seed=9))
    data = tmp_path / "d"
    P.prepare(P.PrepareArgs(corpus=str(corpus), out=str(data), tokenizer="bpe", bpe_vocab=300,
                            held_out=0.2, workers=1), progress=False)
    run = tmp_path / "runs" / "r"
    tiny = ["recipe=roots_staircase", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "model.n_kv_heads=1",
            "model.head_dim=16", "model.ffn_dim=64", "model.max_seq_len=32", "loop=2"]
    assert cli.main(["train", "task=text", f"task.data={data}", "task.seq_len=32",
                     "model.vocab_size=300", *tiny, "train.steps=4", "train.batch_size=4",
                     "train.eval_every=4", "eval.n_samples=8", "eval.loops=[1,2]",
                     f"out_dir={tmp_path / 'runs'}", "name=r", "threads=1"]) == 0
    T._CACHE.clear()
    monkeypatch.setattr(TK.BPETokenizer, "train", lambda *a, **k: pytest.fail("retrained"))
    assert cli.main(["eval", f"ckpt={run}", "loops=[1,2]", "n_samples=8"]) == 0
    assert cli.main(["export", f"run={run}", f"out={tmp_path / 'hf'}"]) == 0
    exported = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    assert len(exported["model"]["vocab"]) == 300


@pytest.mark.parametrize("argv, message", [
    (["prepare", "corpus=shakespeare"], "give the corpus and the output directory"),
    (["prepare", "corpus={tmp}/nope.txt", "out={tmp}/o"], "no such file or directory"),
    (["prepare", "corpus=shakespeare", "out={tmp}/o", "held_out=1.5"], "held_out must be in"),
    (["prepare", "corpus=shakespeare", "out={tmp}/o", "shard_tokens=0"], "shard_tokens must be"),
    (["prepare", "corpus=shakespeare", "out={tmp}/o", "tokenizer={tmp}/no.json"], "no tokenizer file"),
    (["prepare", "corpus=shakespeare", "out={tmp}/full"], "exists and is not an unfinished"),
    (["prepare", "corpus=shakespeare", "out={tmp}/o", "workers=-1"], "workers must be"),
    (["info", "data={tmp}/full"], "holds no meta.json"),
    (["convert"], "name the action first"),
])
def test_bad_prepare_input_is_one_line(tmp_path, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(ConfigError, match=message) as e:
        cli.main(["data", *argv])
    assert "\n" not in str(e.value)


def test_bad_shard_directories_are_one_line(tmp_path):
    corpus = write_txt_corpus(tmp_path / "c", random_docs(100, seed=10))
    data = tmp_path / "d"
    P.prepare(P.PrepareArgs(corpus=str(corpus), out=str(data), held_out=0.2, workers=1),
              progress=False)
    with pytest.raises(ConfigError, match="drop task.corpus and task.tokenizer"):
        T.TextTask(data=str(data), tokenizer="bpe")
    with pytest.raises(ConfigError, match="is not a directory"):
        T.TextTask(data=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no shard of task.seq_len"):
        T.TextTask(data=str(data), seq_len=10 ** 7)
    with pytest.raises(ConfigError, match="other settings"):
        P.prepare(P.PrepareArgs(corpus=str(corpus), out=str(data), held_out=0.3), progress=False)
    shard = data / json.loads((data / S.META_FILE).read_text())["shards"]["train"][0]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ConfigError, match="truncated or damaged"):
        T.TextTask(data=str(data))
    shard.write_bytes(b"garbage" * 1000)
    with pytest.raises(ConfigError, match="not a looped token shard"):
        T.TextTask(data=str(data))
