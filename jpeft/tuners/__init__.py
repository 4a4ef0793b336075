"""One module per method; importing this package registers them all."""

from jpeft.tuners import ia3, lora, vera  # noqa: F401
