"""DoRA: the layer, attaching it to models, PEFT-compatible files, and weight-decomposition analysis."""
