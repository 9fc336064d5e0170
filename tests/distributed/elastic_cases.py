"""Rank functions for --elastic: agree on the surviving groups through the rendezvous store."""
import os

import torch

from megahet.config import build_config
from megahet.hetero.elastic import GROUP_ENV, elastic_setup
from megahet.parallel.context import build_parallel_context


def discover_and_reduce(groups_by_rank, cluster_file):
    """This rank is `groups_by_rank[rank]`; agree on the survivors, build their groups, all-reduce."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if groups_by_rank[rank]:
        os.environ[GROUP_ENV] = groups_by_rank[rank]
    cfg = build_config(overrides=dict(cluster=cluster_file, elastic=True, mock_data=True, train_iters=1,
                                      distributed_timeout_s=60), validate=False)
    setup = elastic_setup(cfg, rank, world, 60.0)
    ctx = build_parallel_context(rank_specs=setup.cluster.rank_specs(), timeout_s=60.0, store=setup.store)
    x = torch.tensor([float(rank + 1)])
    ctx.world_group.all_reduce(x)
    return {"cluster": setup.cluster.to_dict(), "lost": setup.lost, "sum": x.item(), "backend": ctx.backend.name}
