"""Reading and writing transformers model folders: ``config.json`` plus safetensors weights.

The layout is transformers' ``save_pretrained(safe_serialization=True)``: one
``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards listed in
``model.safetensors.index.json``. Reads parse only the safetensors headers and map each
tensor's bytes on demand (read-only ``np.memmap``); pickle weights are never loaded.
Writes stream tensors shard by shard into a staging folder and then swap the files in,
as :func:`jpeft.interop.checkpoint.write_files` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jpeft.errors import CheckpointError
from jpeft.interop.checkpoint import _fsync_dir, read_json_object
from jpeft.interop.hub import looks_like_repo_id

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = [CONFIG_NAME, GENERATION_CONFIG_NAME, "*.safetensors", INDEX_NAME]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER = 100_000_000  # safetensors' own limit
_UNITS = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
_UNITS |= {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
_CONVERT_HINT = (
    "jpeft reads safetensors only and never unpickles. Convert it once in torch: "
    "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`."
)


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    names: dict[str, Any] = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "BOOL": "?"}
    names |= {"F8_E5M2": ml_dtypes.float8_e5m2, "F64": "<f8", "F32": "<f4", "F16": "<f2"}
    names |= {f"{k}{8 * n}": f"<{k.lower()}{n}" for k in "IU" for n in (1, 2, 4, 8)}
    return {key: np.dtype(value) for key, value in names.items()}


def parse_size(size: int | str) -> int:
    """A shard size in bytes: an int, or ``"5GB"``/``"500MB"``/``"2GiB"`` (decimal KB..TB, binary KiB..TiB)."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise TypeError(f"max_shard_size must be an int or a string like '5GB', got {size!r}.")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B)\s*", size, re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot read the size {size!r}; use e.g. '5GB', '500MB' or '2GiB'.")
        value = int(float(match[1]) * _UNITS[match[2].upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return int(value)


def _weights_problem(folder: Path) -> str | None:
    """Why ``folder`` has no readable weights, or None when it holds safetensors weights."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") for n in names) or INDEX_NAME in names:
        return None
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        return f"{str(folder)!r} holds only pickle weights ({shown}). {_CONVERT_HINT}"
    return f"{str(folder)!r} has no model weights ({WEIGHTS_NAME} or {INDEX_NAME})."


def _offline() -> bool:
    """huggingface_hub's offline switch, read now (it reads the environment once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_folder(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder holding a transformers model: ``path_or_id`` itself, or its Hub snapshot.

    Hub downloads fetch only the config, generation config and safetensors files, through
    ``huggingface_hub``'s cache; with ``HF_HUB_OFFLINE`` set only the cache is consulted.

    Raises:
        CheckpointError: no such folder or repo, offline and not cached, or no safetensors weights.
    """
    folder = Path(path_or_id)
    if not folder.exists():
        if not looks_like_repo_id(path_or_id):
            raise CheckpointError(f"no model folder at {str(folder)!r}.")
        folder = _download(os.fspath(path_or_id), revision, token, cache_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is a file; pass the folder that holds {CONFIG_NAME}.")
    problem = _weights_problem(folder)
    if problem:
        raise CheckpointError(problem)
    return folder


def resolve_config_folder(
    path_or_id: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """A folder holding ``path_or_id``'s ``config.json``: the folder itself, or a Hub snapshot of that file only.

    Lets a caller read the architecture before deciding how (and whether) to fetch the weights.

    Raises:
        CheckpointError: as :func:`resolve_model_folder` (offline and not cached, unknown repo, ...).
    """
    folder = Path(path_or_id)
    if folder.exists():
        return folder
    if not looks_like_repo_id(path_or_id):
        raise CheckpointError(f"no model folder at {str(folder)!r}.")
    return _download(os.fspath(path_or_id), revision, token, None, patterns=[CONFIG_NAME])


def _download(
    repo_id: str,
    revision: str | None,
    token: str | bool | None,
    cache_dir: Any,
    patterns: list[str] | None = None,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=HUB_PATTERNS if patterns is None else patterns,
            token=token,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            local_files_only=offline,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointError(
            f"no model folder at {repo_id!r}, and it is not a Hub repository you can read"
            f"{f' at revision {revision!r}' if revision else ''} ({type(err).__name__}). Check the name, or log "
            "in (`huggingface-cli login` / `token=`) for a private repository."
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and it is not in the local cache. Pass an "
            "existing folder, or unset HF_HUB_OFFLINE to download it once."
            if offline
            else "the Hub could not be reached and it is not in the local cache. Pass an existing folder, or "
            "connect once to download it."
        )
        raise CheckpointError(
            f"no model folder at {repo_id!r}; as a Hub repo id it cannot be fetched: {why}"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"downloading model {repo_id!r} from the Hub failed: {err}") from None
    return Path(snapshot)


def read_model_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder, as a dict."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a transformers model folder: it has no {CONFIG_NAME}.")
    return read_json_object(path, "model")


class _Entry(NamedTuple):
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in bytes


class TensorIndex:
    """The tensors of a checkpoint, by name; data is only mapped by :meth:`read`."""

    def __init__(self, entries: Mapping[str, _Entry]):
        self._entries = dict(entries)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"the checkpoint has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._get(name).dtype

    def file_of(self, name: str) -> Path:
        return self._get(name).file

    def read(self, name: str) -> np.ndarray:
        """A read-only array over the tensor's bytes in its file (``np.memmap``; nothing else is read)."""
        entry = self._get(name)
        if 0 in entry.shape:
            empty = np.empty(entry.shape, entry.dtype)
            empty.flags.writeable = False
            return empty
        mapped = np.memmap(entry.file, dtype=entry.dtype, mode="r", offset=entry.offset, shape=entry.shape)
        return np.asarray(mapped)


def _read_header(path: Path, dtypes: Mapping[str, np.dtype]) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{str(path)!r} is not a safetensors file, or it is truncated.")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the safetensors header of {str(path)!r} ({err}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r} has a malformed safetensors header.")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} has a malformed or unsupported header entry {info!r}."
            ) from None
        if (
            min(shape, default=0) < 0
            or not 0 <= start <= end
            or end - start != dtype.itemsize * int(np.prod(shape))
        ):
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has inconsistent shape and offsets.")
        if 8 + length + end > size:
            raise CheckpointError(
                f"{str(path)!r} is truncated: tensor {name!r} needs bytes up to {8 + length + end}, but the file "
                f"has {size}. Re-download or re-save the model."
            )
        entries[name] = _Entry(path, dtype, shape, 8 + length + start)
    return entries


def open_checkpoint(folder: Path) -> TensorIndex:
    """The tensors of a model folder: ``model.safetensors``, shards listed in the index, or a lone ``*.safetensors``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no model folder at {str(folder)!r}.")
    dtypes = _dtypes()
    if (folder / WEIGHTS_NAME).is_file():  # transformers prefers it over an index, too
        return TensorIndex(_read_header(folder / WEIGHTS_NAME, dtypes))
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            valid = all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            valid = False
        if not valid:
            raise CheckpointError(
                f"{str(index_path)!r} is not a valid index: it lacks a name -> file weight_map."
            )
        shards: dict[str, dict[str, _Entry]] = {}
        for shard in dict.fromkeys(weight_map.values()):
            path = folder / shard
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{str(index_path)!r} names a shard outside the folder: {shard!r}.")
            if not path.is_file():
                raise CheckpointError(
                    f"{str(index_path)!r} lists the shard {shard!r}, which is missing from {str(folder)!r}."
                )
            shards[shard] = _read_header(path, dtypes)
        entries = {}
        for name, shard in weight_map.items():
            if name not in shards[shard]:
                raise CheckpointError(
                    f"{str(index_path)!r} puts tensor {name!r} in {shard!r}, which lacks it."
                )
            entries[name] = shards[shard][name]
        return TensorIndex(entries)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return TensorIndex(_read_header(files[0], dtypes))
    if files:
        raise CheckpointError(
            f"{str(folder)!r} holds {len(files)} safetensors files but no {INDEX_NAME} saying which tensor is where."
        )
    raise CheckpointError(_weights_problem(folder) or f"{str(folder)!r} has no safetensors weights.")


def _to_json(data: Mapping[str, Any], what: str) -> bytes:
    """JSON laid out as transformers writes its config and index files."""
    try:
        return (json.dumps(dict(data), indent=2, sort_keys=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the {what} cannot be written as JSON ({err}).") from None


def _write_shard(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(dict(tensors), path, metadata={"format": "pt"})
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def write_model(
    directory: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    max_shard_size: int | str = "5GB",
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Saves a model folder as transformers' ``save_pretrained(safe_serialization=True)`` does.

    Tensors are split into shards exactly as ``huggingface_hub.split_state_dict_into_shards_factory``
    splits them, but streamed: each shard is written (and its arrays released) as soon as it is full.
    All files land in a staging folder inside ``directory`` first and are then moved into place;
    on failure the folder keeps its previous files. Stale shards or a stale single-file/index of a
    previous save are removed. An existing ``generation_config.json`` is kept when none is given.

    Returns:
        The folder, as a ``Path``.
    """
    root = Path(directory)
    limit = parse_size(max_shard_size)
    files = {CONFIG_NAME: _to_json(config, "config")}
    if generation_config is not None:
        files[GENERATION_CONFIG_NAME] = _to_json(generation_config, "generation config")
    try:
        root.mkdir(parents=True, exist_ok=True)  # FileExistsError when it is a file
    except OSError as err:
        raise CheckpointError(
            f"cannot save to the folder {str(root)!r} ({err}); pick another path."
        ) from None
    staging = Path(tempfile.mkdtemp(prefix=".jpeft-staging-", dir=root))
    try:
        shards: list[list[str]] = []
        current: dict[str, np.ndarray] = {}
        current_size = total_size = total_parameters = 0

        def flush(shard: dict[str, np.ndarray]) -> None:
            _write_shard(staging / f"shard-{len(shards)}", shard)
            shards.append(list(shard))

        seen: set[str] = set()
        supported = set(_dtypes().values())
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, value in items:
            if not isinstance(name, str) or not name or name == "__metadata__" or name in seen:
                raise CheckpointError(f"tensor name {name!r} is empty, reserved or repeated.")
            seen.add(name)
            array = np.require(value, requirements="C")  # ascontiguousarray would make scalars 1-d
            if array.dtype not in supported:
                raise CheckpointError(
                    f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold."
                )
            total_size += array.nbytes
            total_parameters += array.size
            if array.nbytes > limit:  # its own shard, ahead of the one being filled (as huggingface_hub does)
                flush({name: array})
                continue
            if current_size + array.nbytes > limit:
                flush(current)
                current, current_size = {}, 0
            current[name] = array
            current_size += array.nbytes
        if current or not shards:
            flush(current)
        del current
        count = len(shards)
        names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        names = names if count > 1 else [WEIGHTS_NAME]
        for i, name in enumerate(names):
            os.replace(staging / f"shard-{i}", staging / name)
        if count > 1:
            index = {
                "metadata": {"total_parameters": total_parameters, "total_size": total_size},
                "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys},
            }
            files[INDEX_NAME] = _to_json(index, "index")
        for name, content in files.items():
            with open(staging / name, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        stale = [
            p.name
            for p in root.iterdir()
            if p.is_file()
            and p.name not in names
            and (_SHARD.fullmatch(p.name) or p.name == (INDEX_NAME if count == 1 else WEIGHTS_NAME))
        ]
        _swap_in(root, staging, [*names, *files], stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _swap_in(root: Path, staging: Path, new: list[str], stale: list[str]) -> None:
    """Moves ``staging/<name>`` over ``root/<name>`` and removes ``stale``; on failure puts everything back."""
    backups = staging / ".old"
    backups.mkdir()
    done: list[tuple[Path, Path | None]] = []  # (target, backup of what it replaced)
    try:
        for name in stale:
            os.replace(root / name, backups / name)
            done.append((root / name, backups / name))
        for name in new:
            target = root / name
            backup = backups / name if target.exists() else None
            if backup is not None:
                try:
                    os.link(target, backup)
                except OSError:
                    shutil.copy2(target, backup)
            done.append((target, backup))
            os.replace(staging / name, target)
        _fsync_dir(root)
    except BaseException:
        for target, saved in reversed(done):
            if saved is not None:
                os.replace(saved, target)
            else:
                target.unlink(missing_ok=True)
        raise
