"""Model-system agnostic core: paths, target matching, trees, registry."""
