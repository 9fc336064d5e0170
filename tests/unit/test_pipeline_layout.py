"""Layer layout per pipeline rank and model chunk (pure logic)."""
import pytest

from megahet.errors import MegahetError
from megahet.parallel.pipeline_layout import layers_per_stage


def test_even_split():
    assert layers_per_stage(12, 3) == [[range(0, 4)], [range(4, 8)], [range(8, 12)]]


def test_single_stage_holds_everything():
    assert layers_per_stage(5, 1) == [[range(0, 5)]]


def test_uneven_pipeline_layers():
    assert layers_per_stage(12, 3, pipeline_layers=[5, 3, 4]) == [[range(0, 5)], [range(5, 8)], [range(8, 12)]]


def test_interleaved_even_blocks_follow_megatron_order():
    # 16 layers, pp=2, vpp=2: block k -> rank k % 2, chunk k // 2.
    assert layers_per_stage(16, 2, vpp_size=2) == [[range(0, 4), range(8, 12)], [range(4, 8), range(12, 16)]]


def test_layers_per_virtual_stage_derives_chunks():
    # 16 layers / pp 2 = 8 per stage, 2 per chunk -> 4 chunks per rank.
    layout = layers_per_stage(16, 2, layers_per_virtual_stage=2)
    assert layout[0] == [range(0, 2), range(4, 6), range(8, 10), range(12, 14)]
    assert layout[1] == [range(2, 4), range(6, 8), range(10, 12), range(14, 16)]


def test_per_stage_counts_split_evenly_into_chunks():
    # Stage 0 has 6 layers (3 per chunk), stage 1 has 2 (1 per chunk); blocks in pipeline order: 3,1,3,1.
    assert layers_per_stage(8, 2, vpp_size=2, pipeline_layers=[6, 2]) == [
        [range(0, 3), range(4, 7)], [range(3, 4), range(7, 8)]]


def test_per_virtual_stage_counts_in_pipeline_order():
    # Entries: rank0 chunk0, rank1 chunk0, rank0 chunk1, rank1 chunk1.
    assert layers_per_stage(10, 2, vpp_size=2, pipeline_layers=[1, 2, 3, 4]) == [
        [range(0, 1), range(3, 6)], [range(1, 3), range(6, 10)]]


def test_every_layer_appears_once():
    layout = layers_per_stage(24, 4, vpp_size=3)
    layers = sorted(i for chunks in layout for r in chunks for i in r)
    assert layers == list(range(24))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=10, pp_size=3), r"--num-layers 10 does not split evenly.*--pipeline-layers"),
    (dict(num_layers=12, pp_size=3, pipeline_layers=[6, 6]), r"--pipeline-layers has 2 entries.*3"),
    (dict(num_layers=12, pp_size=3, pipeline_layers=[5, 3, 3]), r"sums to 11 but --num-layers is 12"),
    (dict(num_layers=12, pp_size=3, pipeline_layers=[6, 0, 6]), r"stage with no layers"),
    (dict(num_layers=12, pp_size=3, pipeline_layers=[12, 0, 0]), r"stage with no layers"),
    (dict(num_layers=12, pp_size=2, layers_per_virtual_stage=4),
     r"not divisible by --num-layers-per-virtual-pipeline-stage 4"),
    (dict(num_layers=12, pp_size=2, vpp_size=2, pipeline_layers=[11, 1]), r"stage 1 \(1\) is fewer than its 2 model"),
    (dict(num_layers=12, pp_size=2, vpp_size=2, pipeline_layers=[3, 3, 6]), r"needs 2 \(per stage\) or 4"),
    (dict(num_layers=12, pp_size=2, vpp_size=3, layers_per_virtual_stage=3), r"contradicts"),
    (dict(num_layers=12, pp_size=1, vpp_size=2), r"--pipeline-model-parallel-size > 1"),
    (dict(num_layers=0, pp_size=1), r"--num-layers must be a positive integer"),
])
def test_errors_name_flags(kwargs, match):
    with pytest.raises(MegahetError, match=match) as info:
        layers_per_stage(**kwargs)
    assert "\n" not in str(info.value)


def test_uneven_stage_counts_split_into_chunks_larger_first():
    # 7 = 4 + 3 on rank 0, 5 = 3 + 2 on rank 1; blocks in pipeline order r0c0, r1c0, r0c1, r1c1.
    assert layers_per_stage(12, 2, 2, pipeline_layers=[7, 5]) == [[range(0, 4), range(7, 10)],
                                                                 [range(4, 7), range(10, 12)]]
