"""Engine: running many peers (the in-process simulator and torch.distributed processes share it)."""
