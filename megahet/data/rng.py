"""Counter-based random numbers: the same (seed, stream, index) gives the same value on every machine.

numpy's Generator streams may change between numpy versions; ranks that build the same index on
different machines must agree, so shuffles and mock tokens come from a fixed hash (splitmix64) instead.
"""
import numpy as np

_MASK = (1 << 64) - 1


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic is intended)."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash64(seed: int, stream: int, index) -> np.ndarray:
    """uint64 hash of each `index` (int or array) under (seed, stream)."""
    key = _mix(np.array([(seed * 0x1000003 + stream) & _MASK], dtype=np.uint64))[0]
    return _mix(np.asarray(index, dtype=np.uint64) ^ key)


def uniform(seed: int, stream: int, index) -> np.ndarray:
    """Floats in [0, 1) for each index."""
    return (hash64(seed, stream, index) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permutation(n: int, seed: int, stream: int) -> np.ndarray:
    """A permutation of range(n) determined by (seed, stream); int64."""
    keys = hash64(seed, stream, np.arange(n, dtype=np.uint64))
    return np.argsort(keys, kind="stable").astype(np.int64)
