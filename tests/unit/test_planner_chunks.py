"""Layer counts for interleaved stages: equal chunks where the total allows, uneven chunks otherwise."""
from megahet.hetero.planner import _round_to_chunks
from megahet.parallel.pipeline_layout import layers_per_stage


def test_multiples_of_the_chunk_count_when_the_total_allows():
    out = _round_to_chunks([7, 5, 6, 6], 2, [1.0] * 4, [0.0] * 4)
    assert sum(out) == 24 and all(n % 2 == 0 for n in out)


def test_llama3_405b_126_layers_on_16_stages_take_4_chunks_unevenly():
    # No split of 126 into 16 multiples of 4 exists; the balanced counts stay, each stage >= 4 layers,
    # and the runtime's layout splits each stage into 4 chunks as evenly as it can (8 -> 2+2+2+2, 6 -> 2+2+1+1).
    balanced = [8] * 15 + [6]
    out = _round_to_chunks(balanced, 4, [1.0] * 16, [0.0] * 16)
    assert out == balanced
    ranges = layers_per_stage(126, 16, 4, out)
    assert [len(r) for r in ranges[0]] == [2, 2, 2, 2] and [len(r) for r in ranges[15]] == [2, 2, 1, 1]


def test_stages_below_the_chunk_count_are_raised_and_the_total_kept():
    out = _round_to_chunks([1, 9, 9, 9], 3, [1.0] * 4, [0.0] * 4)
    assert sum(out) == 28 and min(out) >= 3
