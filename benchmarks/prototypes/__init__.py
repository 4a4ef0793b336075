"""Prototypes of faster training steps and XLA:CPU settings, measured against jpeft's current step."""
