"""Text sources: the built-in corpus, text/JSONL files, local ``datasets`` datasets; a byte tokenizer.

The built-in corpus is generated (deterministically) from a small grammar, so the
default run needs no network and no download, and its regularities are learnable in
a short run: the loss visibly falls.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from jpeft.errors import JpeftError

_NAMES = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Ken"]
_VERBS = ["finds", "writes", "reads", "builds", "tests", "draws", "moves", "keeps", "opens", "sends"]
_ADJECTIVES = ["small", "quiet", "bright", "old", "new", "careful", "quick", "green", "heavy", "simple"]
_NOUNS = ["model", "letter", "garden", "bridge", "program", "river", "engine", "lamp", "table", "map"]
_PLACES = ["the lab", "the harbour", "the library", "the station", "the market", "the hill", "the school"]


def builtin_corpus(n_sentences: int = 4000, seed: int = 0) -> list[str]:
    """Generated sentences ("Ada finds the quiet lamp near the harbour."), one per line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        lines.append(
            f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} "
            f"near {rng.choice(_PLACES)}."
        )
    return lines


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, id 0 doubles as padding): no files, no download."""

    vocab_size = 256
    pad_token_id = 0
    eos_token_id = ord("\n")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JpeftError(
                    f"{path}:{number} is not valid JSON ({err.msg}); JSONL needs one object per line."
                ) from None
            if not isinstance(record, dict) or field not in record:
                raise JpeftError(
                    f"{path}:{number} has no {field!r} field; pass `--text-field` with the right name."
                )
            texts.append(str(record[field]))
    return texts


def load_texts(paths: Sequence[str | os.PathLike], *, text_field: str = "text") -> list[str]:
    """Texts from ``.txt`` files (one example per non-empty line), ``.jsonl``/``.json`` files (one object
    per line, ``text_field``), or a folder saved by ``datasets.Dataset.save_to_disk``."""
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise JpeftError(
                f"data path {str(path)!r} does not exist; pass text/JSONL files or a saved dataset folder."
            )
        if path.is_dir():
            if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
                raise JpeftError(
                    f"{str(path)!r} is a folder but not a dataset saved with `datasets.save_to_disk`; pass the "
                    "text/JSONL files inside it instead."
                )
            try:
                import datasets
            except ImportError:
                raise JpeftError(
                    "reading a saved dataset needs the `datasets` package: pip install datasets"
                ) from None
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
            if text_field not in dataset.column_names:
                raise JpeftError(
                    f"dataset {str(path)!r} has no column {text_field!r}; columns: {dataset.column_names}."
                )
            texts.extend(str(t) for t in dataset[text_field])
        elif path.suffix in (".jsonl", ".json"):
            texts.extend(_read_jsonl(path, text_field))
        else:
            with open(path, encoding="utf-8") as handle:
                texts.extend(line.rstrip("\n") for line in handle if line.strip())
    if not texts:
        raise JpeftError(f"no text found in {[str(p) for p in paths]}.")
    return texts
