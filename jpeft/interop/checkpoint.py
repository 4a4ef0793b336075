"""Reading and writing PEFT adapter folders. The only jpeft code that touches files.

Layout (PEFT's)::

    folder/README.md                       model card
    folder/adapter_config.json             adapter "default"
    folder/adapter_model.safetensors
    folder/<name>/adapter_config.json      any other adapter
    folder/<name>/adapter_model.safetensors

Writes are atomic: every file of a save is written into a hidden staging folder
beside the targets, flushed, and only then moved into place with ``os.replace``; a
failure part-way leaves the previous files untouched. Reads never unpickle: a folder
holding only PEFT's pickle format (``adapter_model.bin``) is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
MODEL_CARD_NAME = "README.md"

_RESERVED_NAMES = frozenset(
    name.lower() for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, MODEL_CARD_NAME)
)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_adapter_name(name: str) -> str:
    """Refuses adapter names that are not a single safe folder name (they become subfolders)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name in (".", "..") or ".." in name:
        raise ValueError(
            f"adapter name {name!r} is not allowed: non-default adapters are saved in a subfolder of that name, "
            "so it must be a plain folder name (letters, digits, '_', '-', '.'; no '/', '\\' or '..')."
        )
    if name.lower() in _RESERVED_NAMES:
        raise ValueError(
            f"adapter name {name!r} is not allowed: it is the name of a file of the save folder's layout; "
            "pick another name."
        )
    return name


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    root = Path(save_directory)
    return root if adapter_name == "default" else root / check_adapter_name(adapter_name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_files(root: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Atomically writes ``{relative path: content}`` under ``root``: all files or none.

    Every file is first written and fsynced in a staging folder inside ``root``. Then
    each existing target is hard-linked (or copied) into the staging folder as a backup
    and the new file is moved over it with ``os.replace``. If any step fails, the files
    already moved are put back (or removed when they are new), so ``root`` holds exactly
    what it held before; the staging folder is always removed.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"cannot save to {str(root)!r}: it exists and is a file, not a folder.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"cannot create the folder {str(root)!r} ({err}); pick another save path."
        ) from None
    staging = Path(tempfile.mkdtemp(prefix=".jpeft-staging-", dir=root))
    moved: list[tuple[Path, Path | None]] = []  # (target, backup of what it replaced)
    try:
        for rel, content in files.items():
            tmp = staging / "new" / rel
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        for index, rel in enumerate(files):
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            backup = None
            if target.exists():
                backup = staging / "old" / str(index)
                backup.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(target, backup)
                except OSError:
                    shutil.copy2(target, backup)
            os.replace(staging / "new" / rel, target)
            moved.append((target, backup))
            _fsync_dir(target.parent)
    except BaseException:
        for target, backup in reversed(moved):
            if backup is not None:
                os.replace(backup, target)
            else:
                target.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def serialize_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    return save(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(metadata or {"format": "pt"})
    )


def adapter_files(adapter_name: str, config_json: str, tensors: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """The files of one adapter, keyed by path relative to the save folder."""
    sub = "" if adapter_name == "default" else check_adapter_name(adapter_name) + "/"
    return {
        f"{sub}{CONFIG_NAME}": config_json.encode("utf-8"),
        f"{sub}{WEIGHTS_NAME}": serialize_tensors(tensors),
    }


def model_card(
    *, base_model: str | None, tags: list[str], pipeline_tag: str | None, peft_version: str
) -> bytes:
    """A PEFT-style ``README.md`` (front matter PEFT's hub tooling reads)."""
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("library_name: peft")
    if pipeline_tag:
        lines.append(f"pipeline_tag: {pipeline_tag}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in tags]
    lines += [
        "---",
        "",
        "# Model Card for Model ID",
        "",
        "This adapter was trained in JAX with jpeft and is saved in Hugging Face PEFT's format; load it with",
        "`peft.PeftModel.from_pretrained(model, path)` in torch or `jpeft.PeftModel.from_pretrained(model, path)`",
        "in JAX.",
        "",
        "### Framework versions",
        "",
        f"- PEFT {peft_version}",
        "",
    ]
    return "\n".join(lines).encode("utf-8")


def resolve_folder(model_id: str | os.PathLike, subfolder: str | None = None) -> Path:
    folder = Path(model_id)
    if subfolder:
        folder = folder / subfolder
    if not folder.exists():
        raise CheckpointError(
            f"no adapter folder at {str(folder)!r}. Pass the folder that holds adapter_config.json "
            "(for a non-default adapter, the parent folder and `subfolder=<adapter name>`)."
        )
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is a file; pass the folder that holds adapter_config.json.")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        hint = (
            f" Adapters are in its subfolders ({shown}): pass one of those (or `subfolder=`)."
            if others
            else ""
        )
        raise CheckpointError(f"{str(folder)!r} is not an adapter folder: it has no {CONFIG_NAME}.{hint}")
    return read_json_object(path, "adapter")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a config file of an ``what``: "adapter", "model"); clear errors otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({err}); re-save the {what}.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / PICKLE_WEIGHTS_NAME).exists():
            raise CheckpointError(
                f"{str(folder)!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which jpeft never loads (it can "
                "run arbitrary code). Convert it in torch: `PeftModel.from_pretrained(model, folder)"
                ".save_pretrained(out)` writes adapter_model.safetensors."
            )
        raise CheckpointError(f"{str(folder)!r} has no {WEIGHTS_NAME}; the adapter weights are missing.")
    from safetensors import SafetensorError
    from safetensors.numpy import load

    data = path.read_bytes()
    try:
        return load(data)
    except KeyError:  # a dtype numpy lacks (bf16, fp8): read it with ml_dtypes
        try:
            return _load_with_ml_dtypes(data)
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({err}).") from None
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({err}); it is corrupt or truncated. Re-save it."
        ) from None


def _load_with_ml_dtypes(data: bytes) -> dict[str, np.ndarray]:
    """safetensors' layout (u64 header size, JSON header, raw little-endian data) for extra dtypes."""
    import ml_dtypes

    dtypes = {
        "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 + size:
        raise ValueError("header runs past the end of the file")
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(dtypes[info["dtype"]])
        if not 0 <= start <= end <= len(body) or (end - start) != dtype.itemsize * int(
            np.prod(info["shape"])
        ):
            raise ValueError(f"tensor {name!r} has offsets outside the file or of the wrong size")
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"]).copy()
    return out
