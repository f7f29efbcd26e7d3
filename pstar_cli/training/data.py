"""Training data as numbered sequences: `build_data(...)` -> TokenSource.

    source = build_data({"kind": "text"}, seq_len=128, vocab_size=256, seed=0)
    x, y = source.get_batch(start=step * batch_size, count=batch_size)   # (count, seq_len) int64

Sequence number g of a source is a pure function of (seed, g): training resumes at any position,
and ranks take disjoint slices of a global batch. Kinds:
- `synthetic`: uniformly random token ids (the benchmark workload); sequence g has its own stream.
- `text`: a UTF-8 file read as bytes, one token per byte (vocab 256), so any language works.
- `tokens`: a flat binary file of uint16 or uint32 token ids, memory-mapped, never read whole.
A file source cuts its stream into windows of seq_len + 1 tokens; each epoch visits them in a new
seeded order, starting from a new seeded offset so window boundaries move between epochs.
"""

import codecs
import os
from pathlib import Path

import torch

from pstar_cli.errors import PstarError

KINDS = ("synthetic", "text", "tokens", "jsonl")  # jsonl, and text with data.tokenizer: training/hf_data.py
BYTE_VOCAB_SIZE = 256
# signed dtype read from disk (torch.from_file) and the mask that restores the unsigned id
_TOKEN_DTYPES = {"uint16": (torch.int16, 0xFFFF), "uint32": (torch.int32, 0xFFFFFFFF)}
_UTF8_CHECK_BYTES = 16 << 20  # validate this much of a text file up front
_VOCAB_SCAN_TOKENS = 1 << 28  # scan token files up to this size for out-of-range ids at start
_SCAN_BLOCK_TOKENS = 1 << 24
_MASK64 = (1 << 64) - 1


class DataError(PstarError):
    """A data file that cannot be used as configured; the message names the path and the fix."""


def default_corpus_path() -> Path:
    """The text corpus shipped with pstar (English and Chinese prose, ~300 KB)."""
    return Path(__file__).resolve().parents[1] / "corpus" / "prose.txt"


class TokenSource:
    """Numbered training sequences; subclasses define how sequence g is made."""

    kind: str

    def __init__(self, seq_len: int, vocab_size: int, seed: int):
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed

    def get_batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets of sequences start..start+count-1, each (count, seq_len)."""
        if start < 0 or count < 1:
            raise ValueError(f"need start >= 0 and count >= 1, got start={start}, count={count}")
        windows = self._windows(start, count)  # (count, seq_len + 1) int64
        return windows[:, :-1], windows[:, 1:]

    def describe(self) -> str:
        raise NotImplementedError

    def _windows(self, start: int, count: int) -> torch.Tensor:
        raise NotImplementedError


class SyntheticTokens(TokenSource):
    """Uniform random token ids; no epochs, every sequence number has its own generator seed."""

    kind = "synthetic"

    def describe(self) -> str:
        return f"synthetic: random token ids in [0, {self.vocab_size})"

    def _windows(self, start: int, count: int) -> torch.Tensor:
        generator = torch.Generator()
        rows = []
        for number in range(start, start + count):
            generator.manual_seed(mix_seed(self.seed, number))
            rows.append(torch.randint(self.vocab_size, (self.seq_len + 1,), generator=generator))
        return torch.stack(rows)


class TokenStream(TokenSource):
    """Windows of a flat token stream (text bytes or a token-id file), reshuffled every epoch."""

    def __init__(self, tokens: torch.Tensor, id_mask: int, kind: str, path: Path,
                 seq_len: int, vocab_size: int, seed: int):
        super().__init__(seq_len, vocab_size, seed)
        self.tokens, self.id_mask, self.kind, self.path = tokens, id_mask, kind, path
        num_whole = (tokens.numel() - 1) // seq_len
        assert num_whole >= 1, "build_data checks that the file holds one window"
        # keep one window's worth of slack so each epoch can start at its own offset
        self.shifts = num_whole >= 2
        self.num_windows = num_whole - 1 if self.shifts else num_whole
        self._epoch_orders: dict[int, tuple[torch.Tensor, int]] = {}

    def describe(self) -> str:
        return (f"{self.kind} {self.path}: {self.tokens.numel():,} tokens, "
                f"{self.num_windows:,} sequences of {self.seq_len} per epoch")

    def _windows(self, start: int, count: int) -> torch.Tensor:
        firsts = torch.tensor([self._window_start(n) for n in range(start, start + count)])
        index = firsts[:, None] + torch.arange(self.seq_len + 1)  # (count, seq_len + 1)
        windows = self.tokens[index].long() & self.id_mask
        self._check_ids(windows, firsts)
        return windows

    def _window_start(self, number: int) -> int:
        epoch, slot = divmod(number, self.num_windows)
        order, offset = self._epoch_order(epoch)
        return offset + int(order[slot]) * self.seq_len

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, int]:
        if epoch not in self._epoch_orders:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            order = torch.randperm(self.num_windows, generator=generator)
            offset = mix_seed(self.seed, epoch, 2) % self.seq_len if self.shifts else 0
            # a batch spans at most two epochs; older orders are not needed again
            self._epoch_orders = {e: v for e, v in self._epoch_orders.items() if e == epoch - 1}
            self._epoch_orders[epoch] = (order, offset)
        return self._epoch_orders[epoch]

    def _check_ids(self, windows: torch.Tensor, firsts: torch.Tensor) -> None:
        if self.kind != "tokens" or int(windows.max()) < self.vocab_size:
            return
        row, col = divmod(int(windows.argmax()), windows.shape[1])
        raise out_of_vocab_error(self.path, int(windows.max()), int(firsts[row]) + col, self.vocab_size)


def build_data(data_cfg: dict, seq_len: int, vocab_size: int, seed: int) -> TokenSource:
    """The TokenSource of a `data` config section; raises DataError for an unusable setting or file."""
    problems = data_problems(data_cfg, seq_len)
    if problems:
        raise DataError(problems[0])
    kind = data_cfg.get("kind") or "synthetic"
    if kind == "synthetic":
        return SyntheticTokens(seq_len, vocab_size, seed)
    from pstar_cli.training import hf_data  # a Hugging Face tokenizer (jsonl, or text with data.tokenizer)
    if hf_data.uses_tokenizer(data_cfg):
        return hf_data.build_tokenized(data_cfg, seq_len, vocab_size, seed)
    path = Path(data_cfg.get("path") or default_corpus_path())
    if kind == "text":
        return _build_text(path, seq_len, vocab_size, seed)
    return _build_tokens(path, data_cfg.get("dtype") or "uint16", seq_len, vocab_size, seed)


def data_problems(data_cfg: dict, seq_len: int) -> list[str]:
    """What makes a `data` section unusable (its first problem, naming the key); [] when usable.

    Files are judged by their size and, for text, by their first bytes: nothing is read whole, so
    `pstar validate` runs this as cheaply as `build_data` does.
    """
    kind, path_value = data_cfg.get("kind") or "synthetic", data_cfg.get("path")
    dtype = data_cfg.get("dtype") or "uint16"
    if kind not in KINDS:
        return [f"data.kind: {kind!r} is not one of {', '.join(KINDS)}"]
    from pstar_cli.training import hf_data  # a Hugging Face tokenizer (jsonl, or text with data.tokenizer)
    if hf_data.uses_tokenizer(data_cfg):
        return hf_data.tokenized_data_problems(data_cfg)
    if data_cfg.get("tokenizer") is not None:
        return ["data.tokenizer: only used when data.kind is text or jsonl; remove it"]
    if kind == "synthetic":
        return [] if path_value is None else [
            "data.path: only used when data.kind is text or tokens; remove it or set data.kind"]
    if kind == "tokens" and dtype not in _TOKEN_DTYPES:
        return [f"data.dtype: {dtype!r} is not one of {', '.join(_TOKEN_DTYPES)}"]
    if kind == "tokens" and not path_value:
        return ["data.path: required when data.kind is tokens (a .bin file of uint16/uint32 token ids)"]
    problem = _file_problem(Path(path_value or default_corpus_path()), kind, dtype, seq_len)
    return [] if problem is None else [problem]


def _file_problem(path: Path, kind: str, dtype: str, seq_len: int) -> str | None:
    if not path.exists():
        return f"data.path: file not found: {path}"
    if not path.is_file():
        return f"data.path: is not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"data.path: {path} is not readable; check its permissions"
    num_bytes = path.stat().st_size
    if num_bytes == 0:
        return f"data.path: file is empty: {path}"
    item_bytes = 1 if kind == "text" else _TOKEN_DTYPES[dtype][0].itemsize
    if num_bytes % item_bytes:
        return (f"data.path: {path} has {num_bytes} bytes, not a whole number of {dtype} token ids; "
                f"check data.dtype")
    if kind == "text" and (problem := _utf8_problem(path)) is not None:
        return problem
    num_tokens = num_bytes // item_bytes
    if num_tokens < seq_len + 1:
        return (f"data.path: {path} holds {num_tokens} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; "
                f"use a longer file or a shorter train.seq_len")
    return None


def _utf8_problem(path: Path) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        head = f.read(_UTF8_CHECK_BYTES)
        whole = not f.read(1)
    try:
        decoder.decode(head, final=whole)  # a character cut at the end of a partial read is fine
    except UnicodeDecodeError as e:
        return (f"data.path: {path} is not UTF-8 text (bad byte at offset {e.start}); "
                f"convert it to UTF-8, or use data.kind tokens for token-id files")
    return None


def _build_text(path: Path, seq_len: int, vocab_size: int, seed: int) -> TokenStream:
    if vocab_size < BYTE_VOCAB_SIZE:
        raise DataError(f"model.vocab_size: text data is byte-level and needs at least "
                        f"{BYTE_VOCAB_SIZE} token ids, got {vocab_size}")
    tokens = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    return TokenStream(tokens, 0xFF, "text", path, seq_len, vocab_size, seed)


def _build_tokens(path: Path, dtype: str, seq_len: int, vocab_size: int, seed: int) -> TokenStream:
    storage_dtype, id_mask = _TOKEN_DTYPES[dtype]
    num_tokens = path.stat().st_size // storage_dtype.itemsize
    tokens = torch.from_file(str(path), shared=False, size=num_tokens, dtype=storage_dtype)
    if tokens.numel() <= _VOCAB_SCAN_TOKENS:
        _scan_vocab(tokens, id_mask, path, vocab_size)  # fail at start, not hours into a run
    return TokenStream(tokens, id_mask, "tokens", path, seq_len, vocab_size, seed)


def _scan_vocab(tokens: torch.Tensor, id_mask: int, path: Path, vocab_size: int) -> None:
    for first in range(0, tokens.numel(), _SCAN_BLOCK_TOKENS):
        block = tokens[first:first + _SCAN_BLOCK_TOKENS].long() & id_mask
        largest = int(block.max())
        if largest >= vocab_size:
            raise out_of_vocab_error(path, largest, first + int(block.argmax()), vocab_size)


def out_of_vocab_error(path: Path, token_id: int, position: int, vocab_size: int) -> DataError:
    return DataError(f"data.path: {path} has token id {token_id} at position {position}, but the "
                     f"model has vocab_size {vocab_size}; raise model.vocab_size or check data.dtype")


def mix_seed(*values: int) -> int:
    """A 64-bit generator seed from integers (splitmix64 steps): nearby inputs, unrelated streams."""
    state = 0
    for value in values:
        state = (state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state
