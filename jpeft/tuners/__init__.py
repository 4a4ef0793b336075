"""One module per method; importing this package registers them all."""

from jpeft.tuners import adalora, ia3, loha, lora, p_tuning, prefix_tuning, prompt_tuning, vera  # noqa: F401
