"""Data for training runs: tokenizers, text/JSONL loading, packing, batches by position."""

from jpeft.data.corpus import ByteTokenizer, builtin_corpus, load_texts
from jpeft.data.packing import Batches, pack

__all__ = ["Batches", "ByteTokenizer", "builtin_corpus", "load_texts", "pack"]
