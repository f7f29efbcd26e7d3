"""Text through a Hugging Face tokenizer: tokenized once, cached beside the data, memory-mapped.

    data:
      kind: jsonl            # one JSON object per line; the text is under `field`
      path: corpus.jsonl
      field: text            # the default
      tokenizer: my-model/   # a local tokenizer directory; default: model.hf_path

`kind: text` with a tokenizer reads a UTF-8 file as one document. Documents are tokenized without
the tokenizer's own special tokens and joined with its end-of-sequence id (after every document),
into one stream of int32 ids written to `<data file>.<key>.tokens` next to the data (or under
`$XDG_CACHE_HOME/pstar/tokens` when that directory is read-only, and for the shipped corpus). The
key hashes the data file's size and modification time, the tokenizer's files, the kind and the
field, so a changed file or tokenizer is tokenized again and an unchanged one is reused. The stream is then read like a
`tokens` file (pstar_cli/training/data.py): memory-mapped with torch.from_file, cut into windows.

A text file is tokenized in blocks of whole lines (for the progress bar): a token never spans two
blocks, which can differ from tokenizing the file in one piece only where a block ends.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from pathlib import Path

import torch

from pstar_cli.training.data import DataError, TokenStream, default_corpus_path

TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_CACHE_VERSION = "1"
_BATCH_TEXT_BYTES = 1 << 20  # text sent to the tokenizer per call
_INSTALL_HINT = "pip install 'pstar[hf]'"


def uses_tokenizer(data_cfg: dict) -> bool:
    return (data_cfg.get("kind") == "jsonl"
            or (data_cfg.get("kind") == "text" and data_cfg.get("tokenizer") is not None))


def tokenized_data_problems(data_cfg: dict) -> list[str]:
    """Problems of a jsonl / tokenized-text data section, naming the key; [] when usable."""
    kind, path, tokenizer = data_cfg.get("kind"), data_cfg.get("path"), data_cfg.get("tokenizer")
    problems = []
    if kind == "jsonl" and not path:
        problems.append("data.path: required when data.kind is jsonl (a file of one JSON object per line)")
    elif path is not None or kind == "text":
        file = Path(path or default_corpus_path())
        if not file.is_file():
            problems.append(f"data.path: file not found: {file}")
        elif file.stat().st_size == 0:
            problems.append(f"data.path: file is empty: {file}")
    if not isinstance(data_cfg.get("field") or "", str) or not (data_cfg.get("field") or "text"):
        problems.append("data.field: expected the name of the JSON key that holds the text")
    if tokenizer is None:
        problems.append("data.tokenizer: required for data.kind jsonl: a local Hugging Face tokenizer "
                        "directory (with model.hf_path, that directory's tokenizer is the default)")
    elif not (Path(tokenizer) / TOKENIZER_FILE).is_file():
        problems.append(f"data.tokenizer: {tokenizer} has no {TOKENIZER_FILE} (a local Hugging Face "
                        "tokenizer directory, as tokenizer.save_pretrained writes it)")
    # a missing `tokenizers` package is reported when the data is built (and, with model.hf_path,
    # by the model check first): one message, not one per section
    return problems


# ---- the tokenizer ---------------------------------------------------------------------------

def load_tokenizer(directory: str | Path):
    """(tokenizers.Tokenizer, end-of-sequence id) of a local tokenizer directory."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(f"data.tokenizer: reading a Hugging Face tokenizer needs the optional package "
                        f"tokenizers: {_INSTALL_HINT}") from None

    directory = Path(directory)
    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    eos_id = _eos_id(directory, tokenizer)
    if eos_id is None:
        raise DataError(f"data.tokenizer: {directory} names no end-of-sequence token (eos_token in "
                        "tokenizer_config.json, or eos_token_id in config.json); documents are joined with it")
    return tokenizer, eos_id


def _eos_id(directory: Path, tokenizer) -> int | None:
    settings = _read_json(directory / "tokenizer_config.json")
    token = settings.get("eos_token") or _read_json(directory / "special_tokens_map.json").get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    for name in ("generation_config.json", "config.json"):
        value = _read_json(directory / name).get("eos_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- the cache -------------------------------------------------------------------------------

def cache_key(data_path: Path, tokenizer_dir: Path, kind: str, field: str) -> str:
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{kind}|{field}|".encode())
    stat = data_path.stat()
    digest.update(f"{stat.st_size}|{stat.st_mtime_ns}|".encode())
    for name in _TOKENIZER_FILES:
        file = tokenizer_dir / name
        digest.update(name.encode() + (file.read_bytes() if file.is_file() else b"-"))
    return digest.hexdigest()[:16]


def cache_path(data_path: Path, key: str) -> Path:
    """Beside the data when that directory is writable, else in the user's cache directory (and
    there for the corpus shipped inside pstar's package, which is not the user's directory)."""
    shipped = data_path.resolve() == default_corpus_path().resolve()
    if os.access(data_path.parent, os.W_OK) and not shipped:
        return data_path.with_name(f"{data_path.name}.{key}.tokens")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pstar" / "tokens"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{data_path.name}.{key}.tokens"


# ---- tokenizing ------------------------------------------------------------------------------

def _documents(path: Path, kind: str, field: str):
    """(text, bytes read so far) per document (jsonl) or per block of lines (text)."""
    with open(path, "rb") as f:
        if kind == "text":
            block, size = [], 0
            for line in f:
                block.append(line)
                size += len(line)
                if size >= _BATCH_TEXT_BYTES:
                    yield _decode(b"".join(block), path), f.tell(), False
                    block, size = [], 0
            yield _decode(b"".join(block), path), f.tell(), True
            return
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield _jsonl_text(line, number, path, field), f.tell(), True


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"data.path: {path} is not UTF-8 text (bad byte near offset {error.start} of a block)")


def _jsonl_text(line: bytes, number: int, path: Path, field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise DataError(f"data.path: {path} line {number} is not JSON ({error}); one object per line")
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"data.field: {path} line {number} has no text under '{field}'; set data.field "
                        f"to the key that holds it")
    return text


def tokenize_file(path: Path, out: Path, tokenizer, eos_id: int, kind: str, field: str,
                  show_progress: bool = True) -> int:
    """Write the file's documents as int32 ids, each followed by eos_id; returns the token count."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    num_tokens, pending, pending_ends, pending_bytes = 0, [], [], 0
    columns = (TextColumn("tokenizing {task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress, open(tmp, "wb") as f:
        task = progress.add_task(path.name, total=path.stat().st_size)

        def flush() -> int:
            ids = array.array("i")
            for encoding, ends in zip(tokenizer.encode_batch(pending, add_special_tokens=False), pending_ends):
                ids.extend(encoding.ids)
                if ends:
                    ids.append(eos_id)
            ids.tofile(f)
            return len(ids)

        for text, done_bytes, ends in _documents(path, kind, field):
            pending.append(text)
            pending_ends.append(ends)
            pending_bytes += len(text)
            if pending_bytes >= _BATCH_TEXT_BYTES:
                num_tokens += flush()
                pending, pending_ends, pending_bytes = [], [], 0
                progress.update(task, completed=done_bytes)
        if pending:
            num_tokens += flush()
    os.replace(tmp, out)
    return num_tokens


def build_tokenized(data_cfg: dict, seq_len: int, vocab_size: int, seed: int,
                    show_progress: bool = True) -> TokenStream:
    """The TokenSource of a jsonl / tokenized-text data section (tokenizing it on first use)."""
    problems = tokenized_data_problems(data_cfg)
    if problems:
        raise DataError(problems[0])
    kind, field = data_cfg["kind"], data_cfg.get("field") or "text"
    path = Path(data_cfg.get("path") or default_corpus_path())
    tokenizer_dir = Path(data_cfg["tokenizer"])
    out = cache_path(path, cache_key(path, tokenizer_dir, kind, field))
    if not out.is_file():
        tokenizer, eos_id = load_tokenizer(tokenizer_dir)
        tokenize_file(path, out, tokenizer, eos_id, kind, field, show_progress)
    num_tokens = out.stat().st_size // 4
    if num_tokens < seq_len + 1:
        raise DataError(f"data.path: {path} gives {num_tokens} tokens, fewer than train.seq_len + 1 = "
                        f"{seq_len + 1}; use more text or a shorter train.seq_len")
    tokens = torch.from_file(str(out), shared=False, size=num_tokens, dtype=torch.int32)
    largest = int(tokens.max())
    if largest >= vocab_size:
        raise DataError(f"data.tokenizer: {tokenizer_dir} gives token id {largest}, but the model has "
                        f"vocab_size {vocab_size}; use the model's own tokenizer")
    return TokenStream(tokens, 0xFFFFFFFF, kind, path, seq_len, vocab_size, seed)
