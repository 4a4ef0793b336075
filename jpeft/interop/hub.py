"""The Hugging Face Hub, through ``huggingface_hub``: download adapter folders, upload them.

Downloads go through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE``,
``HF_ENDPOINT`` and tokens behave as everywhere in the HF stack) and fetch only the files an
adapter needs: never the pickle ``adapter_model.bin``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from jpeft.errors import CheckpointError
from jpeft.interop import checkpoint

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def looks_like_repo_id(model_id: str | os.PathLike) -> bool:
    text = os.fspath(model_id)
    return bool(_REPO_ID.fullmatch(text)) and not text.startswith(".") and ".." not in text


def resolve_adapter_folder(
    model_id: str | os.PathLike,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder holding the adapter: ``model_id`` itself, or its Hub snapshot."""
    local = Path(model_id) / subfolder if subfolder else Path(model_id)
    if local.exists() or not looks_like_repo_id(model_id):
        return checkpoint.resolve_folder(model_id, subfolder)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(
            f"no folder {str(local)!r} here, and `huggingface_hub` is not installed to fetch {model_id!r} from the "
            "Hub: `pip install huggingface_hub`, or pass a local folder."
        ) from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}{name}" for name in (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME)]
    try:
        snapshot = snapshot_download(
            os.fspath(model_id),
            revision=revision,
            allow_patterns=patterns,
            token=token,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointError(
            f"no adapter folder at {str(local)!r}, and {model_id!r} is not a Hub repository you can read"
            f"{f' at revision {revision!r}' if revision else ''} ({type(err).__name__}). Check the name, or log in "
            "(`huggingface-cli login` / `token=`) for a private repository."
        ) from None
    except LocalEntryNotFoundError as err:
        from huggingface_hub import constants
        from huggingface_hub.errors import OfflineModeIsEnabled

        offline = constants.HF_HUB_OFFLINE or isinstance(err.__cause__, OfflineModeIsEnabled)
        why = (
            "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
            if offline
            else "the Hub could not be reached"
        )
        raise CheckpointError(
            f"no adapter folder at {str(local)!r}; as a Hub repo id, {model_id!r} cannot be fetched: {why} and it "
            "is not in the local cache. Pass an existing folder, or connect once to download it."
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"downloading adapter {model_id!r} from the Hub failed: {err}") from None
    folder = checkpoint.resolve_folder(snapshot, subfolder)
    if not (folder / checkpoint.WEIGHTS_NAME).is_file():
        where = (
            f"{model_id!r}"
            + (f" (subfolder {subfolder!r})" if subfolder else "")
            + (f" at revision {revision!r}" if revision else "")
        )
        raise CheckpointError(_missing_weights_message(where, os.fspath(model_id), prefix, revision, token))
    return folder


def _missing_weights_message(where: str, repo_id: str, prefix: str, revision: str | None, token) -> str:
    """Why a Hub adapter has no safetensors weights: a pickle-only repo is named as such (never downloaded)."""
    try:
        from huggingface_hub import HfApi

        info = HfApi(token=token).model_info(repo_id, revision=revision or "main")
        files = [sibling.rfilename for sibling in info.siblings or []]
    except Exception:  # listing is only for a better message
        files = []
    if f"{prefix}{checkpoint.PICKLE_WEIGHTS_NAME}" in files:
        return (
            f"Hub adapter {where} holds only {checkpoint.PICKLE_WEIGHTS_NAME}, a pickle file, which jpeft never "
            "downloads or loads (it can run arbitrary code). Ask its owner for adapter_model.safetensors, or convert "
            "it in torch: `PeftModel.from_pretrained(model, repo).save_pretrained(out)`."
        )
    return f"Hub adapter {where} has no {checkpoint.WEIGHTS_NAME}; the adapter weights are missing."


def push_files(
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload adapter (jpeft)",
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Uploads ``{relative path: content}`` as one commit to model repo ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="jpeft-push-") as folder:
        checkpoint.write_files(folder, files)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    return str(getattr(info, "commit_url", info))
