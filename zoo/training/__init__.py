"""The training core: the Method hooks, the trainer, EMA, checkpoints, the registry."""
