"""Data sources: determinism, resumability, epochs, file kinds and the errors users see."""

import importlib.util

import pytest
import torch

from pstar_cli.training import data as data_mod
from pstar_cli.training.data import DataError, build_data, default_corpus_path
from pstar_cli.errors import PstarError


def _pack(ids, dtype):
    width = 2 if dtype == "uint16" else 4
    return b"".join(int(i).to_bytes(width, "little") for i in ids)


def test_synthetic_is_a_pure_function_of_seed_and_position():
    source = build_data({"kind": "synthetic"}, seq_len=16, vocab_size=50, seed=3)
    x, y = source.get_batch(10, 6)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    assert 0 <= int(x.min()) and int(x.max()) < 50
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    again = build_data({"kind": "synthetic"}, seq_len=16, vocab_size=50, seed=3)
    torch.testing.assert_close(again.get_batch(13, 2)[0], x[3:5])
    other_seed = build_data({"kind": "synthetic"}, seq_len=16, vocab_size=50, seed=4)
    assert not torch.equal(other_seed.get_batch(10, 6)[0], x)
    assert not torch.equal(x[0], x[1])


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "mixed.txt"
    sentences = [f"Line {i}: the ferry leaves at {i % 12} o'clock. 第{i}行，渡船开了。\n" for i in range(80)]
    path.write_text("".join(sentences), encoding="utf-8")
    return path


def test_text_windows_are_slices_of_the_file(text_file):
    raw = text_file.read_bytes()
    source = build_data({"kind": "text", "path": str(text_file)}, seq_len=32, vocab_size=256, seed=0)
    x, y = source.get_batch(0, 20)
    assert int(x.max()) >= 128  # Chinese arrives as multi-byte UTF-8
    for row_x, row_y in zip(x, y):
        window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
        assert window in raw
        torch.testing.assert_close(row_x[1:], row_y[:-1])


def test_resuming_and_rank_slices_give_the_same_sequences(text_file):
    cfg = {"kind": "text", "path": str(text_file)}
    whole = build_data(cfg, 24, 256, seed=5).get_batch(100, 8)[0]
    resumed = build_data(cfg, 24, 256, seed=5)
    rank_slices = [resumed.get_batch(100 + 2 * r, 2)[0] for r in range(4)]
    torch.testing.assert_close(torch.cat(rank_slices), whole)


def window_starts(source, epoch):
    """Where in the text file each sequence of one epoch starts."""
    x, _ = source.get_batch(epoch * source.num_windows, source.num_windows)
    raw = source.path.read_bytes()
    return [raw.find(bytes(row.tolist())) for row in x]


def _find(raw, row):
    hits = (raw.unfold(0, len(row), 1) == row).all(dim=1).nonzero()
    return int(hits[0])


def test_each_epoch_visits_every_window_once_in_a_new_order(text_file):
    source = build_data({"kind": "text", "path": str(text_file)}, seq_len=64, vocab_size=256, seed=1)
    first, second = window_starts(source, 0), window_starts(source, 1)
    for starts in (first, second):
        spacing = sorted(b - a for a, b in zip(sorted(starts), sorted(starts)[1:]))
        assert len(set(starts)) == source.num_windows and set(spacing) == {64}
    assert first != second


def test_epoch_offsets_move_window_boundaries(text_file):
    source = build_data({"kind": "text", "path": str(text_file)}, seq_len=64, vocab_size=256, seed=1)
    offsets = {min(window_starts(source, epoch)) for epoch in range(6)}
    assert len(offsets) > 1 and all(0 <= o < 64 for o in offsets)


@pytest.mark.parametrize("dtype, ids", [
    ("uint16", [0, 1, 40000, 65535, 7] * 40),
    ("uint32", [0, 70000, 3_000_000_000, 4_294_967_295, 9] * 40),
])
def test_token_files_keep_unsigned_ids(tmp_path, dtype, ids):
    path = tmp_path / "ids.bin"
    path.write_bytes(_pack(ids, dtype))
    vocab = 65536 if dtype == "uint16" else 1 << 32
    source = build_data({"kind": "tokens", "path": str(path), "dtype": dtype}, 10, vocab, seed=0)
    x, y = source.get_batch(0, 12)
    stream = torch.tensor(ids)
    for row_x, row_y in zip(x, y):
        window = torch.cat([row_x, row_y[-1:]])
        assert _find(stream, window) >= 0
    assert set(x.flatten().tolist()) <= set(ids)


def test_token_id_beyond_vocab_is_found_at_start(tmp_path):
    path = tmp_path / "ids.bin"
    path.write_bytes(_pack([1, 2, 3] * 30 + [999] + [4] * 30, "uint16"))
    with pytest.raises(DataError, match=r"token id 999 at position 90.*vocab_size 500"):
        build_data({"kind": "tokens", "path": str(path)}, 8, 500, seed=0)


def test_token_id_beyond_vocab_is_found_in_a_batch_of_a_big_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_VOCAB_SCAN_TOKENS", 0)  # as if the file were too big to scan
    path = tmp_path / "ids.bin"
    path.write_bytes(_pack([999] * 50, "uint16"))
    source = build_data({"kind": "tokens", "path": str(path)}, 8, 500, seed=0)
    with pytest.raises(DataError, match="token id 999"):
        source.get_batch(0, 2)


@pytest.mark.parametrize("make, cfg, fragment", [
    (None, {"kind": "text"}, "file not found"),
    (b"", {"kind": "text"}, "is empty"),
    (b"\xff\xfe\x00 not text" * 10, {"kind": "text"}, "is not UTF-8 text"),
    (b"abc", {"kind": "text"}, "fewer than train.seq_len + 1"),
    (b"\x01\x02\x03", {"kind": "tokens", "dtype": "uint16"}, "not a whole number"),
    ("dir", {"kind": "text"}, "is not a file"),
])
def test_unusable_files_raise_one_clear_error(tmp_path, make, cfg, fragment):
    path = tmp_path / "data.bin"
    if make == "dir":
        path.mkdir()
    elif make is not None:
        path.write_bytes(make)
    with pytest.raises(DataError) as info:
        build_data({**cfg, "path": str(path)}, 16, 256, seed=0)
    message = str(info.value)
    assert fragment in message and str(path) in message and message.startswith("data.path:")
    assert "\n" not in message and isinstance(info.value, PstarError)


@pytest.mark.parametrize("cfg, vocab, fragment", [
    ({"kind": "parquet"}, 256, "data.kind: 'parquet' is not one of"),
    ({"kind": "tokens"}, 256, "data.path: required"),
    ({"kind": "tokens", "path": "x.bin", "dtype": "int8"}, 256, "data.dtype"),
    ({"kind": "text"}, 100, "model.vocab_size"),
])
def test_bad_settings_name_the_key(cfg, vocab, fragment):
    with pytest.raises(DataError, match=fragment):
        build_data(cfg, 16, vocab, seed=0)


def test_shipped_corpus_is_the_default_text():
    path = default_corpus_path()
    text = path.read_text(encoding="utf-8")
    assert 200_000 <= path.stat().st_size <= 400_000
    assert sum("\u4e00" <= c <= "\u9fff" for c in text) > 5_000  # some Chinese prose too
    source = build_data({"kind": "text"}, seq_len=256, vocab_size=256, seed=0)
    assert source.path == path and source.num_windows > 1000


def test_shipped_corpus_is_what_the_generator_writes():
    generator_path = default_corpus_path().parent / "generate.py"
    spec = importlib.util.spec_from_file_location("corpus_generate", generator_path)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.build_corpus() == default_corpus_path().read_text(encoding="utf-8")


def test_mixed_seeds_differ_for_neighbouring_inputs():
    seeds = {data_mod.mix_seed(s, n) for s in range(4) for n in range(100)}
    assert len(seeds) == 400 and all(0 <= s < 1 << 64 for s in seeds)
