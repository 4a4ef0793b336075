"""PEFT checkpoint format: files and torch naming. The only code that touches files."""
