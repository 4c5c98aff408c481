"""Engine: running many peers (in-process simulator now; torch.distributed runtime later)."""
