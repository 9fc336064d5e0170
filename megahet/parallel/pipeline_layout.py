"""Which global transformer layers each pipeline rank holds, per model chunk (virtual stage).

Megatron interleaving: the model is cut into ``pp * vpp`` consecutive blocks in pipeline order, and
block ``k`` lives on rank ``k % pp`` as local model chunk ``k // pp``. So virtual stage ``v`` of rank
``r`` holds block ``v * pp + r``; activations go rank 0 -> 1 -> ... -> pp-1 -> rank 0 (next chunk).
Every rank therefore holds the same number of chunks, which is what the interleaved schedule needs.

``pipeline_layers`` (``--pipeline-layers 5,3,4``) gives uneven counts. Accepted forms:
  * ``pp`` entries: layers per pipeline stage; with ``vpp > 1`` each stage's count is split into its
    ``vpp`` chunks as evenly as possible, earlier chunks taking the remainder (7 layers, 2 chunks:
    4 + 3), so uneven stages and interleaving combine without a divisibility rule;
  * ``pp * vpp`` entries (only when ``vpp > 1``): layers per virtual stage in pipeline order
    (block 0, 1, ..., i.e. rank 0 chunk 0, rank 1 chunk 0, ..., rank 0 chunk 1, ...).
Every stage and every chunk needs at least one layer: the first holds the embedding, the last the
head, and an empty middle stage only adds a pipeline hop.
"""
from __future__ import annotations

from megahet.errors import MegahetError

__all__ = ["layers_per_stage", "check_positive"]


def layers_per_stage(num_layers: int, pp_size: int, vpp_size: int = 1,
                     pipeline_layers: list[int] | None = None,
                     layers_per_virtual_stage: int | None = None) -> list[list[range]]:
    """Split ``num_layers`` global layers over ``pp_size`` ranks with ``vpp_size`` chunks each.

    Args:
        num_layers: ``--num-layers``.
        pp_size: ``--pipeline-model-parallel-size``.
        vpp_size: model chunks per rank (``--virtual-pipeline-model-parallel-size``); derived from
            ``layers_per_virtual_stage`` when that is given.
        pipeline_layers: ``--pipeline-layers``; see the module docstring for the accepted lengths.
        layers_per_virtual_stage: ``--num-layers-per-virtual-pipeline-stage``.

    Returns:
        ``result[rank][chunk]`` is the range of global layer indices of that model chunk.
    """
    check_positive(num_layers, "--num-layers")
    check_positive(pp_size, "--pipeline-model-parallel-size")
    check_positive(vpp_size, "--virtual-pipeline-model-parallel-size")
    if pipeline_layers is not None:
        _check_pipeline_layers(pipeline_layers, num_layers)
    if layers_per_virtual_stage is not None:
        check_positive(layers_per_virtual_stage, "--num-layers-per-virtual-pipeline-stage")
        vpp_size = _vpp_from_layers_per_virtual_stage(num_layers, pp_size, vpp_size, pipeline_layers,
                                                      layers_per_virtual_stage)
    if vpp_size > 1 and pp_size == 1:
        raise MegahetError("virtual pipeline stages need --pipeline-model-parallel-size > 1; drop "
                           "--num-layers-per-virtual-pipeline-stage / --virtual-pipeline-model-parallel-size")
    blocks = _block_sizes(num_layers, pp_size, vpp_size, pipeline_layers)
    # Block k (pipeline order) -> rank k % pp, chunk k // pp.
    result: list[list[range]] = [[] for _ in range(pp_size)]
    start = 0
    for k, size in enumerate(blocks):
        result[k % pp_size].append(range(start, start + size))
        start += size
    return result


def check_positive(value: int, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MegahetError(f"{flag} must be a positive integer, got {value!r}")


def _check_pipeline_layers(counts: list[int], num_layers: int) -> None:
    if not isinstance(counts, (list, tuple)) or any(isinstance(n, bool) or not isinstance(n, int)
                                                     for n in counts):
        raise MegahetError(f"--pipeline-layers must be a list of integers such as 5,3,4, got {counts!r}")
    text = ",".join(map(str, counts))
    if sum(counts) != num_layers:
        raise MegahetError(f"--pipeline-layers {text} sums to {sum(counts)} but --num-layers is {num_layers}; "
                           f"make them agree")
    if any(n < 1 for n in counts):
        raise MegahetError(f"--pipeline-layers {text} has a stage with no layers; give every stage at least "
                           f"one layer or lower --pipeline-model-parallel-size")


def _vpp_from_layers_per_virtual_stage(num_layers: int, pp_size: int, vpp_size: int,
                                       pipeline_layers: list[int] | None, per_chunk: int) -> int:
    """Megatron's rule: chunks per rank = layers per stage // --num-layers-per-virtual-pipeline-stage."""
    if pipeline_layers is None:
        if num_layers % pp_size:
            raise MegahetError(f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size "
                               f"{pp_size}; give per-stage counts with --pipeline-layers")
        stage_counts = [num_layers // pp_size] * pp_size
    elif len(pipeline_layers) != pp_size:
        raise MegahetError(f"with --num-layers-per-virtual-pipeline-stage, --pipeline-layers needs one entry per "
                           f"stage (--pipeline-model-parallel-size {pp_size}), got {len(pipeline_layers)}")
    else:
        stage_counts = list(pipeline_layers)
    if any(n % per_chunk for n in stage_counts):
        raise MegahetError(f"layers per stage {stage_counts} are not divisible by "
                           f"--num-layers-per-virtual-pipeline-stage {per_chunk}; change one of them")
    chunks = {n // per_chunk for n in stage_counts}
    if len(chunks) != 1:
        raise MegahetError(f"layers per stage {stage_counts} give a different number of model chunks per stage "
                           f"with --num-layers-per-virtual-pipeline-stage {per_chunk}; use equal stage counts")
    derived = chunks.pop()
    if vpp_size not in (1, derived):
        raise MegahetError(f"--virtual-pipeline-model-parallel-size {vpp_size} contradicts "
                           f"--num-layers-per-virtual-pipeline-stage {per_chunk} ({derived} chunks); give only one")
    return derived


def _block_sizes(num_layers: int, pp_size: int, vpp_size: int,
                 pipeline_layers: list[int] | None) -> list[int]:
    """Layers per virtual stage in pipeline order (``pp * vpp`` entries)."""
    n_blocks = pp_size * vpp_size
    if pipeline_layers is None:
        if num_layers % n_blocks:
            raise MegahetError(f"--num-layers {num_layers} does not split evenly over {pp_size} pipeline stages "
                               f"x {vpp_size} model chunks; give uneven counts with --pipeline-layers")
        return [num_layers // n_blocks] * n_blocks
    counts = list(pipeline_layers)
    allowed = {pp_size, n_blocks}
    if len(counts) not in allowed:
        want = f"{pp_size}" if vpp_size == 1 else f"{pp_size} (per stage) or {n_blocks} (per virtual stage)"
        raise MegahetError(f"--pipeline-layers has {len(counts)} entries but needs {want} for "
                           f"--pipeline-model-parallel-size {pp_size}; give one count per stage")
    if len(counts) == n_blocks:
        return counts
    # One entry per stage with vpp > 1: split each stage as evenly as possible into its chunks.
    short = [r for r, n in enumerate(counts) if n < vpp_size]
    if short:
        raise MegahetError(f"--pipeline-layers entry for stage {short[0]} ({counts[short[0]]}) is fewer than its "
                           f"{vpp_size} model chunks; give that stage at least {vpp_size} layers or fewer chunks")
    return [split_evenly(counts[k % pp_size], vpp_size)[k // pp_size] for k in range(n_blocks)]


def split_evenly(n: int, parts: int) -> list[int]:
    """`n` layers in `parts` chunks, sizes differing by at most one, the larger first."""
    return [n // parts + (1 if c < n % parts else 0) for c in range(parts)]
