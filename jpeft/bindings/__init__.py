"""How each model system is driven (transformers Flax, linen; NNX to follow)."""
