"""silverlabel: web images -> machine-labeled, ImageNet-like pretraining datasets.

Stages (``silverlabel --help``): ingest, label, select, shard, reinforce, train, eval, card.
"""

__version__ = "0.3.0"
