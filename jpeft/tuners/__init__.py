"""One module per method; importing this package registers them all."""

from jpeft.tuners import lora, vera  # noqa: F401
