"""What ``PeftModel`` runs, as pure functions of (plans, adapters, active adapters).

``forward``: one call's effective base params and layer hook; ``mixed_batch``: the hook
of a batch whose examples each use their own adapter; ``merging``: adapters folded into
the base weights (quantized kernels decoded and re-encoded around it).
"""
