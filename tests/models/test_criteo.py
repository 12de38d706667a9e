"""Criteo TSV loader: parsing, hashing, malformed lines (skip or fail), resume, training on it."""

from __future__ import annotations

import random

import pytest
import torch

from loka.models import Ranker, TrainConfig, train
from loka.models.criteo import CriteoFormatError, CriteoStream


def _line(rng: random.Random, label=None) -> str:
    label = rng.choice("01") if label is None else label
    ints = [rng.choice(["", str(rng.randint(-2, 5000))]) for _ in range(13)]
    cats = [rng.choice(["", f"{rng.getrandbits(32):08x}"]) for _ in range(26)]
    return "\t".join([label] + ints + cats) + "\n"


@pytest.fixture
def rng():
    return random.Random(int(torch.randint(0, 1 << 30, ())))


def test_parses_valid_lines_into_batches(tmp_path, rng):
    path = tmp_path / "day_0.tsv"
    path.write_text("".join(_line(rng) for _ in range(25)))
    stream = CriteoStream([path], batch_size=10, hash_buckets=1000)
    batches = list(stream)
    assert [b.size for b in batches] == [10, 10, 5]
    b = batches[0]
    assert b.dense.shape == (10, 13) and b.sparse.shape == (10, 26) and b.labels.shape == (10, 1)
    assert 0 <= b.sparse.min() and b.sparse.max() < 1000
    ids = torch.cat([x.example_ids for x in batches])
    assert ids.unique().numel() == 25


def test_malformed_lines_fail_with_line_number_or_are_skipped(tmp_path, rng):
    lines = [_line(rng) for _ in range(6)]
    lines[2] = "1\t2\t3\n"  # too few fields
    lines[4] = _line(rng).replace("\t", "\tx", 1)  # bad integer
    path = tmp_path / "bad.tsv"
    path.write_text("".join(lines))
    with pytest.raises(CriteoFormatError, match=r"bad.tsv:3: expected 40 tab-separated fields, got 3"):
        list(CriteoStream([path], batch_size=4))
    stream = CriteoStream([path], batch_size=4, on_error="skip")
    assert sum(b.size for b in stream) == 4 and stream.skipped == 2


def test_bad_label_and_hex_are_named(tmp_path, rng):
    fields = _line(rng).rstrip("\n").split("\t")
    fields[0], fields[20] = "1", "zz"
    path = tmp_path / "hex.tsv"
    path.write_text("\t".join(fields) + "\n")
    with pytest.raises(CriteoFormatError, match="C7"):
        list(CriteoStream([path]))
    path.write_text("2" + _line(rng)[1:])
    with pytest.raises(CriteoFormatError, match="label"):
        list(CriteoStream([path]))


def test_position_resumes_across_files(tmp_path, rng):
    paths = []
    for i in range(2):
        p = tmp_path / f"part{i}.tsv"
        p.write_text("".join(_line(rng) for _ in range(7)))
        paths.append(p)
    full = [b.example_ids for b in CriteoStream(paths, batch_size=3)]
    stream = CriteoStream(paths, batch_size=3)
    head = [next(stream).example_ids for _ in range(2)]
    rest_stream = CriteoStream(paths, batch_size=3)
    rest_stream.load_state_dict(stream.state_dict())
    rest = [b.example_ids for b in rest_stream]
    assert torch.equal(torch.cat(head + rest), torch.cat(full))


def test_trains_a_criteo_shaped_ranker(tmp_path, rng):
    path = tmp_path / "train.tsv"
    path.write_text("".join(_line(rng) for _ in range(200)))
    stream = CriteoStream([path], batch_size=32, hash_buckets=500)
    model = Ranker(stream.config("tiny"))
    result = train(TrainConfig(size="tiny", steps=100, batch_size=32, progress=False), model=model, data=stream)
    assert result.step == 7  # the data ended after 200 lines; training stops there
    assert all(x == x for x in result.losses)


@pytest.mark.parametrize("value", [str(10**400), "١٢", "1_000", " 7 ", "+3", "0x10", "7.5", "1e3",
                                   "9" * 19])
def test_values_int_would_accept_or_overflow_on_are_bad_values(tmp_path, rng, value):
    """One bad integer: a CriteoFormatError naming the column with on_error='fail', the line
    skipped and counted with 'skip', never parsed as a number nor an OverflowError."""
    lines = [_line(rng) for _ in range(5)]
    fields = lines[3].rstrip("\n").split("\t")
    column = rng.randrange(13)
    fields[1 + column] = value
    lines[3] = "\t".join(fields) + "\n"
    path = tmp_path / "odd.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CriteoFormatError, match=rf"odd.tsv:4: integer column I{column + 1} has"):
        list(CriteoStream([path], batch_size=8))
    stream = CriteoStream([path], batch_size=8, on_error="skip")
    batches = list(stream)
    assert sum(b.size for b in batches) == 4 and stream.skipped == 1


@pytest.mark.parametrize("value", ["٣a", " ab", "a_b", "0xab", "ab "])
def test_categories_must_be_plain_ascii_hex(tmp_path, rng, value):
    fields = _line(rng).rstrip("\n").split("\t")
    fields[14] = value
    path = tmp_path / "cat.tsv"
    path.write_text("\t".join(fields) + "\n", encoding="utf-8")
    stream = CriteoStream([path], on_error="skip")
    assert list(stream) == [] and stream.skipped == 1


def test_valid_integers_still_parse_exactly(tmp_path, rng):
    fields = _line(rng).rstrip("\n").split("\t")
    values = [rng.randint(-10**17, 10**17) for _ in range(13)]
    fields[1:14] = [str(v) for v in values]
    path = tmp_path / "ok.tsv"
    path.write_text("\t".join(fields) + "\n")
    (batch,) = list(CriteoStream([path]))
    assert batch.dense[0].tolist() == [float(torch.tensor(float(v))) for v in values]
