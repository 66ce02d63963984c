"""The text task (looped.data.text): local corpora through `datasets` offline, the held-out split,
windows, tokenizers, errors, the built-in Shakespeare corpus and lm_metrics."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from looped.data import text as T
from looped.data import IGNORE, TASKS, build_task
from looped.errors import ConfigError
from looped.training.scoring import lm_metrics

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None

WORDS = ("the quick brown fox jumps over a lazy dog while wise ravens caw and "
         "naïve cafés serve crème brûlée — fine ünïcödé").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(4, 12, (1,), generator=g)),),
                            generator=g)
        out.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may reach the hub; each test loads its corpus afresh."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    T._CACHE.clear()
    yield
    T._CACHE.clear()


def as_bytes(ids: torch.Tensor) -> bytes:
    return bytes(ids.to(torch.uint8).tolist())


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ---------------------------------------------------------------------------------------------
# Local files, offline


def test_txt_round_trips_bytes(tmp_path):
    text = "First line, ünïcödé — and more.\n" * 40 + "The end.\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    assert T.load_documents(str(path)) == [text]
    task = T.TextTask(corpus=str(path), seq_len=16, held_out=0.1)
    assert task.vocab_size == 256 and task.corpus.split_by == "tail"  # one document: the tail
    assert task.train_tokens.dtype == torch.uint8
    assert as_bytes(task.train_tokens) + as_bytes(task.held_out_tokens) == text.encode("utf-8")
    assert len(task.held_out_tokens) >= 0.09 * len(text.encode())


def test_jsonl_rows_are_documents(tmp_path):
    docs = sentences(30)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    assert T.load_documents(str(path), text_field="body") == docs
    with pytest.raises(ConfigError) as e:  # the default column 'text' is not there
        T.load_documents(str(path))
    assert "'text'" in one_line(e) and "body" in str(e.value)


def test_parquet_and_directories(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = sentences(12, seed=1)
    pq.write_table(pa.table({"text": docs[:6], "n": list(range(6))}), tmp_path / "a.parquet")
    assert T.load_documents(str(tmp_path / "a.parquet")) == docs[:6]
    (tmp_path / "b.txt").write_text(docs[6], encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs[7:]]),
                                     encoding="utf-8")
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01")  # not a corpus file: ignored
    got = T.load_documents(str(tmp_path))
    assert sorted(got) == sorted(docs)


def test_held_out_documents_never_overlap():
    docs = [f"document {i}: " + s for i, s in enumerate(sentences(40, seed=2))]
    docs += [docs[3]] * 3  # identical documents stay on one side
    train, held, how = T.split_documents(docs, 0.1)
    assert how == "documents"
    train_docs, held_docs = train.split(T.SEPARATOR), held.split(T.SEPARATOR)
    assert not set(train_docs) & set(held_docs)
    assert sorted(train_docs + held_docs) == sorted(docs)
    assert 4 <= len(held_docs) <= 7
    assert T.split_documents(list(reversed(docs)), 0.1)[1].split(T.SEPARATOR) == \
        list(reversed(held_docs))  # membership depends on content, not order


def test_held_out_tail_for_few_documents(tmp_path):
    train, held, how = T.split_documents(["abcdefghij" * 10, "klmnop" * 10], 0.1)
    assert how == "tail" and train + held == "abcdefghij" * 10 + T.SEPARATOR + "klmnop" * 10
    assert len(held) == round(0.1 * len(train + held))


def test_task_windows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in sentences(200, seed=3)),
                    encoding="utf-8")
    task = T.TextTask(corpus=str(path), seq_len=32, held_out=0.1)
    assert task.corpus.split_by == "documents" and task.seq_len == 32
    a = task.sample(8, torch.Generator().manual_seed(5))
    b = task.sample(8, torch.Generator().manual_seed(5))
    c = task.sample(8, torch.Generator().manual_seed(6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape == a.targets.shape == (8, 32) and a.inputs.dtype == torch.long
    assert torch.equal(a.inputs[:, 1:], a.targets[:, :-1])  # targets: inputs shifted by one
    assert (a.targets != IGNORE).all() and a.hop_targets is None
    train, held = as_bytes(task.train_tokens), as_bytes(task.held_out_tokens)
    for row in torch.cat([a.inputs, a.targets[:, -1:]], 1):
        assert as_bytes(row) in train
    ev = T.TextTask(corpus=str(path), seq_len=32, held_out=0.1, split="eval")
    e = ev.sample(8, torch.Generator().manual_seed(5))
    for row in torch.cat([e.inputs, e.targets[:, -1:]], 1):
        assert as_bytes(row) in held
    # held-out windows: deterministic, back to back, each held-out token a target once
    wins = list(task.held_out_batches(4, max_batches=2))
    assert len(wins) == 2 and wins[0].inputs.shape == (4, 32)
    assert torch.equal(wins[0].inputs[0, 0:], task.held_out_tokens[:32].long())
    assert torch.equal(wins[0].inputs[1], task.held_out_tokens[32:64].long())
    n_all = sum(bt.targets.numel() for bt in task.held_out_batches(7))
    assert n_all == (len(task.held_out_tokens) - 1) // 32 * 32


def test_registered_and_built_from_config():
    from looped import load_config

    assert TASKS["text"] is T.TextTask
    cfg = load_config(["task=text", "task.seq_len=24"])
    assert cfg.task.name == "text" and cfg.task.corpus == "shakespeare"
    knobs = {k: v for k, v in cfg.task.items() if k not in ("name", "eval")}
    with pytest.raises(ConfigError) as e:  # every TaskConfig knob is accepted
        T.TextTask(**knobs, split="test")
    assert "split" in one_line(e)
    task = build_task(cfg.task)
    assert isinstance(task, T.TextTask) and task.seq_len == 24 and task.split == "train"


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the path


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus=str(missing))
    assert str(missing) in one_line(e)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus=str(empty))
    assert str(empty) in one_line(e) and "empty" in str(e.value)
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus=str(tmp_path / "d"))
    assert str(tmp_path / "d") in one_line(e)


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is no parquet file")
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus=str(bad))
    assert str(bad) in one_line(e)
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    broken = tmp_path / "zbroken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": unquoted\n')
    with pytest.raises(ConfigError) as e:  # in a directory: the culprit is named
        T.TextTask(corpus=str(tmp_path), seq_len=2)
    assert "zbroken.jsonl" in one_line(e) or "bad.parquet" in str(e.value)
    other = tmp_path / "x.docx"
    other.write_bytes(b"PK")
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus=str(other))
    assert str(other) in one_line(e)


def test_too_short_and_bad_knobs(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny corpus")
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus=str(path), seq_len=64)
    assert "seq_len" in one_line(e)
    for kw in (dict(tokenizer="words"), dict(held_out=1.0), dict(held_out=0.0, split="eval"),
               dict(tokenizer="bpe", bpe_vocab=100)):
        with pytest.raises(ConfigError) as e:
            T.TextTask(corpus=str(path), seq_len=2, **kw)
        one_line(e)


def test_hub_name_offline_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus="someone/some-dataset")
    assert "someone/some-dataset" in one_line(e) and "offline" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The built-in corpus


def test_shakespeare_corpus_ships_with_the_package():
    plays = T.shakespeare_plays()
    assert len(plays) == 38 and sum(map(len, plays)) > 4_900_000
    task = T.TextTask(corpus="shakespeare", seq_len=128)
    total = len(task.train_tokens) + len(task.held_out_tokens)
    assert total > 1_000_000 and task.corpus.n_documents == len(plays)
    assert task.corpus.split_by == "documents"
    assert 0.01 < len(task.held_out_tokens) / total < 0.15
    text = task.decode(task.train_tokens[:200_000])
    assert "**" not in text and ":\n" in text  # speakers as "NAME:" lines
    ev = T.TextTask(corpus="shakespeare", seq_len=128, split="eval")
    assert ev.held_out_tokens is task.held_out_tokens  # one load per process


# ---------------------------------------------------------------------------------------------
# lm_metrics


def tiny_model(vocab: int):
    from conftest import make_model

    return make_model(vocab_size=vocab, d_model=32, n_layers=1, max_seq_len=32, loop=2)


def test_lm_metrics_bytes(tmp_path, single_thread):
    path = tmp_path / "c.txt"
    path.write_text(" ".join(sentences(60, seed=4)), encoding="utf-8")
    task = T.TextTask(corpus=str(path), seq_len=16, held_out=0.2)
    model = tiny_model(256)
    m = lm_metrics(model, task, loops=2, max_batches=3, batch_size=4)
    assert m["tokens"] == 3 * 4 * 16 == m["bytes"]
    assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2), rel=1e-9)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
    assert m["loss"] > 1.0  # random weights
    # the same number by hand
    nats = 0.0
    for b in task.held_out_batches(4, 3):
        logits = model(b.inputs, loops=2).logits
        nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.targets.flatten(),
                                                  reduction="sum").item()
    assert m["loss"] == pytest.approx(nats / m["tokens"], rel=1e-5)
    assert lm_metrics(model, task, loops=2, max_batches=3, batch_size=4) == m
    assert lm_metrics(model, task, loops=1, max_batches=3, batch_size=4)["loss"] != m["loss"]


@pytest.mark.skipif(not HAS_TOKENIZERS, reason="the BPE tokenizer needs PyPI tokenizers: "
                                               "pip install tokenizers")
def test_bpe(tmp_path, single_thread):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in sentences(300, seed=5)),
                    encoding="utf-8")
    task = T.TextTask(corpus=str(path), seq_len=16, tokenizer="bpe", bpe_vocab=300,
                      held_out=0.1)
    assert task.vocab_size == 300 and int(task.train_tokens.max()) < 300
    docs = T.load_documents(str(path))
    train_text, held_text, _ = T.split_documents(docs, 0.1)
    assert task.decode(task.train_tokens) == train_text  # byte-level BPE is lossless
    assert task.decode(task.held_out_tokens) == held_text
    assert len(task.train_tokens) < 0.8 * len(train_text.encode())  # it merges
    b = task.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    model = tiny_model(300)
    m = lm_metrics(model, task, loops=1, max_batches=2, batch_size=4)
    n_bytes = sum(len(task.decode(bt.targets.flatten()).encode())
                  for bt in task.held_out_batches(4, 2))
    assert m["bytes"] == n_bytes > m["tokens"] == 2 * 4 * 16
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / (math.log(2) * n_bytes))
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "c.txt"
    path.write_text("some text " * 50)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus=str(path), seq_len=8, tokenizer="bpe", bpe_vocab=300)
    assert "pip install tokenizers" in one_line(e)
    monkeypatch.setattr(T, "SHAKESPEARE_FILE", tmp_path / "gone.json.xz")
    with pytest.raises(ConfigError) as e:
        T.TextTask(corpus="shakespeare")
    assert "cannot read" in one_line(e) and "reinstall the package" in one_line(e)
