"""Mixture of experts: router, token dispatchers (all-to-all / all-gather over EP), grouped experts.

`MoELayer` replaces the MLP of MoE layers; `MoETracker` is the training loop's handle for aux-loss
scaling, router statistics and the aux-loss-free expert-bias update. Import the layer from
`megahet.moe.layer` (it imports the model's MLP); this package root stays light.
"""
from megahet.moe.tracker import MoETracker

__all__ = ["MoETracker"]
