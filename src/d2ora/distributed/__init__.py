"""Peers as processes: torch.distributed transport for the same rounds loop as the simulator."""
