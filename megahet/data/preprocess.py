"""Tokenize a JSONL or text file into an indexed dataset, in resumable chunks (tools/preprocess_data.py).

Input documents are cut into chunks of `chunk_docs`; chunk k becomes `P_part{k}.bin/.idx` and
`P.progress.json` records how many chunks are finished, so an interrupted run picks up at the first
unfinished chunk. When the input is exhausted the parts are merged into `P.bin/.idx` (atomically) and
the parts and progress file are removed. The output bytes do not depend on interruptions or on workers.
"""
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import time
from typing import Callable, Iterator

import numpy as np

from megahet.data.cache import atomic_write_json
from megahet.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, data_file_path,
                                          index_file_path, meta_file_path)
from megahet.errors import MegahetError
from megahet.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
PROGRESS_VERSION = 1


def read_documents(path: str, json_keys=("text",)) -> Iterator[str]:
    """Documents of `path`: one per JSON line (its json_keys fields joined by newlines) for .jsonl,
    one per blank-line-separated paragraph for .txt."""
    if not os.path.isfile(path):
        raise MegahetError(f"input {path} not found; pass an existing file to --input")
    if path.endswith(JSON_SUFFIXES):
        return _read_jsonl(path, tuple(json_keys))
    if path.endswith(TEXT_SUFFIXES):
        return _read_paragraphs(path)
    raise MegahetError(f"input {path} has an unknown format; use a .jsonl (one JSON object per line) "
                       f"or .txt (blank-line-separated documents) file")


def _read_jsonl(path: str, json_keys) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise MegahetError(f"{path}:{number} is not valid JSON; write one JSON object per line") from None
            missing = [key for key in json_keys if not isinstance(record.get(key), str)]
            if missing:
                raise MegahetError(f"{path}:{number} has no text field {missing[0]!r}; "
                                   f"pass the right --json-keys")
            yield "\n".join(record[key] for key in json_keys)


def _read_paragraphs(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        lines: list[str] = []
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
        if lines:
            yield "\n".join(lines)


_worker_tokenizer = None
_worker_append_eod = False


def _init_worker(tokenizer_args, append_eod: bool, tokenizer=None) -> None:
    """Set the encoding globals; a pool worker builds its own tokenizer, this process reuses its one."""
    global _worker_tokenizer, _worker_append_eod
    _worker_tokenizer = tokenizer if tokenizer is not None else build_tokenizer(*tokenizer_args)
    _worker_append_eod = append_eod


def _encode(text: str) -> np.ndarray:
    ids = _worker_tokenizer.tokenize(text)
    if _worker_append_eod:
        ids.append(_worker_tokenizer.eod)
    return np.asarray(ids, dtype=np.int64)


def part_prefix(output_prefix: str, k: int) -> str:
    return f"{output_prefix}_part{k}"


def _fingerprint(input_path, tokenizer_args, json_keys, append_eod, chunk_docs) -> dict:
    """What the finished chunks depend on; a restart with anything different starts over."""
    stat = os.stat(input_path)
    model = tokenizer_args[1]
    model_hash = None
    if model and os.path.isfile(model):
        with open(model, "rb") as handle:
            model_hash = hashlib.sha256(handle.read()).hexdigest()
    return {"version": PROGRESS_VERSION, "input": os.path.abspath(input_path), "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns, "tokenizer_type": tokenizer_args[0],
            "tokenizer_model_sha256": model_hash, "vocab_size": tokenizer_args[2],
            "json_keys": list(json_keys), "append_eod": append_eod, "chunk_docs": chunk_docs}


def _remove_dataset(prefix: str) -> None:
    for path in (data_file_path(prefix), index_file_path(prefix), meta_file_path(prefix)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _finished_chunks(output_prefix: str, fingerprint: dict) -> int:
    """Chunks a previous run finished with the same settings (0 when there is none to resume).

    Parts from the first unusable one on are deleted, so a shorter rerun leaves no stale parts behind.
    """
    progress_path, done = output_prefix + ".progress.json", 0
    if os.path.isfile(progress_path):
        with open(progress_path) as handle:
            try:
                state = json.load(handle)
            except json.JSONDecodeError:
                state = {}
        if state.get("fingerprint") == fingerprint:
            done = state.get("done_chunks", 0)
        else:
            logger.warning("%s was written for other input or settings; starting over", progress_path)
    for k in range(done):
        try:
            IndexedDataset(part_prefix(output_prefix, k)).close()
        except MegahetError as error:
            logger.warning("re-encoding from chunk %d: %s", k, error)
            done = k
            break
    k = done
    while os.path.exists(index_file_path(part_prefix(output_prefix, k))) or os.path.exists(
            data_file_path(part_prefix(output_prefix, k))):
        _remove_dataset(part_prefix(output_prefix, k))
        k += 1
    return done


def preprocess_data(input_path: str, output_prefix: str, tokenizer_type: str,
                    tokenizer_model: "str | None" = None, vocab_size: "int | None" = None, *,
                    json_keys=("text",), append_eod: bool = False, workers: int = 1,
                    chunk_docs: int = 100_000, log_interval: int = 10_000,
                    progress: "Callable[[int, int, float], None] | None" = None,
                    max_chunks: "int | None" = None) -> "str | None":
    """Tokenize `input_path` into `output_prefix.bin/.idx`; returns the prefix.

    Args:
        tokenizer_type, tokenizer_model, vocab_size: as for `build_tokenizer` (each worker builds its own).
        append_eod: add the tokenizer's eod id after every document (needed for GPT pretraining).
        workers: encoding processes (1 encodes in this process).
        progress: called as progress(documents, tokens, seconds) every `log_interval` documents;
            by default the progress is logged.
        max_chunks: stop after finishing this many new chunks and return None (for time-limited jobs;
            run again to continue).
    Empty documents are dropped. The output is identical whatever the workers or interruptions.
    """
    if workers < 1 or chunk_docs < 1:
        raise MegahetError(f"workers ({workers}) and chunk_docs ({chunk_docs}) must be >= 1; fix --workers")
    tokenizer_args = (tokenizer_type, tokenizer_model, vocab_size)
    tokenizer = build_tokenizer(*tokenizer_args)
    documents = read_documents(input_path, json_keys)
    fingerprint = _fingerprint(input_path, tokenizer_args, json_keys, append_eod, chunk_docs)
    done = _finished_chunks(output_prefix, fingerprint)
    if done:
        logger.info("resuming %s: %d chunks of %d documents already encoded", output_prefix, done, chunk_docs)
    documents = itertools.islice(documents, done * chunk_docs, None)
    report = progress or _log_progress

    pool = None
    if workers > 1:
        pool = multiprocessing.Pool(workers, _init_worker, (tokenizer_args, append_eod))
        encoded = pool.imap(_encode, documents, chunksize=64)
    else:
        _init_worker(tokenizer_args, append_eod, tokenizer)
        encoded = map(_encode, documents)
    try:
        finished = _encode_chunks(encoded, output_prefix, tokenizer.vocab_size, done, chunk_docs, fingerprint,
                                  log_interval, report, max_chunks)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if finished is None:
        return None
    return _merge_parts(output_prefix, finished, tokenizer.vocab_size)


def _log_progress(documents: int, tokens: int, seconds: float) -> None:
    logger.info("%d documents, %d tokens, %.0f docs/s", documents, tokens, documents / max(seconds, 1e-9))


def _encode_chunks(encoded, output_prefix, vocab_size, done, chunk_docs, fingerprint, log_interval, report,
                   max_chunks) -> "int | None":
    """Write chunk parts from `done` on; returns the total number of parts, or None if stopped early."""
    start, documents, tokens, new_chunks = time.monotonic(), 0, 0, 0
    builder, in_chunk = None, 0
    try:
        for ids in encoded:
            if builder is None:
                builder = IndexedDatasetBuilder(part_prefix(output_prefix, done), vocab_size=vocab_size)
            if len(ids):
                builder.add_document(ids)
            in_chunk, documents, tokens = in_chunk + 1, documents + 1, tokens + len(ids)
            if documents % log_interval == 0:
                report(documents, tokens, time.monotonic() - start)
            if in_chunk < chunk_docs:
                continue
            builder.finalize()
            done, builder, in_chunk, new_chunks = done + 1, None, 0, new_chunks + 1
            atomic_write_json(output_prefix + ".progress.json", {"fingerprint": fingerprint, "done_chunks": done})
            if max_chunks is not None and new_chunks >= max_chunks:
                logger.info("stopped after %d new chunks; run again to continue", new_chunks)
                return None
    except BaseException:
        if builder is not None:
            builder.abort()
        raise
    if builder is not None:
        builder.finalize()
        done += 1
    report(documents, tokens, time.monotonic() - start)
    return done


def _merge_parts(output_prefix: str, parts: int, vocab_size: int) -> str:
    builder = IndexedDatasetBuilder(output_prefix, vocab_size=vocab_size)
    try:
        for k in range(parts):
            builder.add_index(part_prefix(output_prefix, k))
    except BaseException:
        builder.abort()
        raise
    builder.finalize()
    for k in range(parts):
        _remove_dataset(part_prefix(output_prefix, k))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(output_prefix + ".progress.json")
    logger.debug("wrote %s.bin/.idx from %d chunks", output_prefix, parts)
    return output_prefix
