"""Files that several ranks may build at once: an exclusive lock plus write-to-temp-then-rename.

The lock makes one rank do the work while the others wait; the rename means a reader never sees a
half-written file even where locks do not work (some network filesystems), at worst work is repeated.
"""
import contextlib
import hashlib
import json
import logging
import os
import tempfile

import numpy as np

logger = logging.getLogger("megahet")

try:
    import fcntl
except ImportError:  # Windows: rely on atomic renames alone
    fcntl = None


@contextlib.contextmanager
def file_lock(path: str):
    """Hold an exclusive advisory lock on `path` (created if needed) for the `with` block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def temp_path_for(path: str) -> str:
    """A fresh, unique temporary file name in the directory of `path` (same filesystem, so rename is atomic)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(handle)
    os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file should get normal permissions
    return temp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs):
    """Write through a temp file that replaces `path` (fsynced) only when the block succeeds."""
    temp = temp_path_for(path)
    try:
        with open(temp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """np.save to `path` atomically (np.save appends .npy to names without it, so write via a handle)."""
    with atomic_open(path) as handle:
        np.save(handle, array, allow_pickle=False)


def cached_arrays(cache_dir: str, stem: str, description: dict, parts, build, what: str):
    """The arrays `build()` returns, cached in `cache_dir` as STEM-KEY-PART.npy (KEY hashes `description`).

    One rank builds under a lock while the others wait; STEM-KEY.json, written last, marks the cache
    complete, and later calls map the arrays read-only. Where the directory cannot be written the
    arrays are built in memory (logged with `what`).
    """
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    base = os.path.join(cache_dir, f"{stem}-{key}")
    paths = [f"{base}-{part}.npy" for part in parts]
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with file_lock(base + ".lock"):
            if os.path.isfile(base + ".json"):
                return tuple(np.load(path, mmap_mode="r") for path in paths)
            arrays = build()
            for path, array in zip(paths, arrays):
                atomic_save_npy(path, array)
            atomic_write_json(base + ".json", description)  # written last: marks the cache complete
            return arrays
    except OSError as error:
        logger.warning("cannot cache the %s in %s (%s); building it in memory", what, cache_dir, error)
        return build()
