"""TP and EP shards timed with their peers: each local group runs its shard of a layer, the embedding and
the head (TP) or of a MoE layer (EP) at once, collectives included, and the cost model takes those times
for those degrees."""
import pytest
import torch

from megahet.config import build_config
from megahet.hetero.profile import load_or_measure_shards_together


def _tiny(**moe):
    return build_config(overrides=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                                       vocab_size=512, global_batch_size=4, micro_batch_size=1, mock_data=True,
                                       train_iters=1, **moe), validate=False).model


def test_tp_shards_are_timed_with_their_peers_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAHET_CACHE_DIR", str(tmp_path))
    model = _tiny()
    # Ranks that do not split into TP groups of one speed: nothing to measure, nothing spawned.
    assert load_or_measure_shards_together(model, torch.float32, [1.0, 0.5], 2) is None
    assert load_or_measure_shards_together(model, torch.float32, [1.0, 1.0, 1.0], 2) is None
    times = load_or_measure_shards_together(model, torch.float32, [1.0, 1.0], 2, micro_batch_sizes=(1, 2),
                                            vocab_size=512, min_seconds=0.05, timeout=180)
    assert len(times) == 2
    for rank in times:
        assert set(rank) == {f"{w}@tp2/{b}" for w in ("dense", "embed", "head") for b in (1, 2)}
        assert all(f > 0 and b > 0 for f, b in rank.values())

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr("megahet.testing.run_distributed", no_measuring)
    again = load_or_measure_shards_together(model, torch.float32, [1.0, 1.0], 2, micro_batch_sizes=(1, 2),
                                            vocab_size=512)
    assert again == times
    with pytest.raises(AssertionError, match="measured again"):
        load_or_measure_shards_together(model, torch.float32, [0.5, 0.5], 2, micro_batch_sizes=(1, 2),
                                        vocab_size=512)


def test_ep_shards_of_a_moe_layer_are_timed_with_their_peers(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAHET_CACHE_DIR", str(tmp_path))
    moe = _tiny(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64)
    # Nothing to shard: a dense model has no EP, EP must divide the experts, and blocks need one speed.
    assert load_or_measure_shards_together(_tiny(), torch.float32, [1.0, 1.0], 1, 2) is None
    assert load_or_measure_shards_together(moe, torch.float32, [1.0, 1.0, 1.0], 1, 3) is None
    assert load_or_measure_shards_together(moe, torch.float32, [1.0, 0.5], 1, 2) is None
    assert load_or_measure_shards_together(moe, torch.float32, [1.0, 1.0], 1, 1) is None
    # A sim pair at half speed: the shard's compute is stretched as the runtime stretches it.
    times = load_or_measure_shards_together(moe, torch.float32, [0.5, 0.5], 1, 2, micro_batch_sizes=(1,),
                                            vocab_size=512, min_seconds=0.05, timeout=180)
    assert len(times) == 2
    for rank in times:
        assert set(rank) == {"moe@ep2/1"}  # only the MoE layer: EP shards nothing else
        assert all(f > 0 and b > 0 for f, b in rank.values())
