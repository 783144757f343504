"""Training: DeepSpeed trainer, distributed SST state, checkpoints, evaluation and their commands."""
