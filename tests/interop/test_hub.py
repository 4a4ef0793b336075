"""Hub download and upload through ``huggingface_hub``, against a fake Hub served on loopback.

Only the network boundary is stubbed: a small HTTP server implements the Hub endpoints
``huggingface_hub`` 0.36 calls for ``snapshot_download`` (repo info, HEAD/GET of
``resolve`` URLs), ``create_repo``, and ``upload_folder`` (README validation, preupload,
NDJSON commit). ``huggingface_hub`` is pointed at it through ``HF_ENDPOINT`` (and the
constants it read at import time), with its cache in ``tmp_path``. jpeft itself runs
unchanged, from ``push_to_hub`` to ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import pickle
import re
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import jax
import numpy as np
import pytest

import jpeft
from tests import parity

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub import file_download as hf_file_download  # noqa: E402
from huggingface_hub.utils import reset_sessions  # noqa: E402

TOKEN = "hf_jpeft_fake_token"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}

# --------------------------------------------------------------------------- fake Hub


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """Model repos in memory: ``repos[repo_id] = {"commits": {sha: files}, "main": sha}``."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, lower-cased headers)
        self.create_payloads: list[dict] = []
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=10)
            self.running = False

    # -- repo state

    def commit(self, repo_id: str, files: dict[str, bytes], deleted: tuple[str, ...] = ()) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            current = dict(repo["commits"][repo["main"]]) if repo["main"] else {}
            for path in deleted:
                current.pop(path, None)
            current.update(files)
            digest = hashlib.sha1(repr((repo["main"], sorted(current.items()))).encode())
            sha = digest.hexdigest()
            repo["commits"][sha] = current
            repo["main"] = sha
            return sha

    def create(self, repo_id: str, files: dict[str, bytes] | None = None) -> str | None:
        with self.lock:
            self.repos.setdefault(repo_id, {"commits": {}, "main": None})
        return self.commit(repo_id, files) if files else None

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["main"] if revision == "main" else revision]

    def paths_requested(self) -> list[str]:
        return [unquote(urlparse(path).path) for _, path, _ in self.requests]

    # -- HTTP

    def _handler_class(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _record(self):
                with hub.lock:
                    hub.requests.append(
                        (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                    )

            def _send(self, status, body=b"", headers=None, *, head=False):
                self.send_response(status)
                headers = dict(headers or {})
                headers.setdefault("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status, data, headers=None):
                self._send(
                    status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}
                )

            def _error(self, status, code, message, *, head=False, **extra):
                body = json.dumps({"error": message, **extra}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._send(status, body, headers, head=head)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _revision(self, repo_id, revision, *, head=False):
                """``(sha, files)`` of ``revision`` in ``repo_id``, or None after sending the error."""
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found", head=head)
                    return None
                sha = repo["main"] if revision == "main" else revision
                if sha not in repo["commits"]:
                    self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
                    return None
                return sha, repo["commits"][sha]

            def _resolve(self, head):
                path = urlparse(self.path).path
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if match is None:
                    return self._error(404, None, "Not found", head=head)
                repo_id, revision, filename = (unquote(g) for g in match.groups())
                found = self._revision(repo_id, revision, head=head)
                if found is None:
                    return None
                sha, files = found
                if filename not in files:
                    return self._error(404, "EntryNotFound", "Entry not found", head=head)
                content = files[filename]
                headers = {
                    "Content-Type": "application/octet-stream",
                    "X-Repo-Commit": sha,
                    "ETag": f'"{_git_blob_sha(content)}"',
                }
                return self._send(200, content, headers, head=head)

            def do_HEAD(self):
                self._record()
                self._resolve(head=True)

            def do_GET(self):
                self._record()
                path = urlparse(self.path).path
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
                if match is None:
                    return self._resolve(head=False)
                repo_id, revision = (unquote(g) for g in match.groups())
                found = self._revision(repo_id, revision)
                if found is None:
                    return None
                sha, files = found
                return self._json(
                    200,
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(files)],
                    },
                )

            def do_POST(self):
                self._record()
                body = self._body()
                path = urlparse(self.path).path
                if path == "/api/repos/create":
                    data = json.loads(body)
                    hub.create_payloads.append(data)
                    repo_id = (
                        f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    )
                    if data.get("type", "model") != "model":
                        return self._error(400, None, "only model repos")
                    if repo_id in hub.repos:
                        # as the Hub does; create_repo(exist_ok=True) reads the url from this answer
                        return self._error(
                            409, None, "You already created this model repo", url=f"{hub.url}/{repo_id}"
                        )
                    hub.create(repo_id)
                    return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if match is None:
                    return self._error(404, None, "Not found")
                repo_id, action, revision = (unquote(g) for g in match.groups())
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if revision != "main":
                    return self._error(400, None, "the fake Hub commits to main only")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(
                        200,
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "uploadMode": "regular",
                                    "shouldIgnore": False,
                                    "oid": None,
                                }
                                for f in files
                            ]
                        },
                    )
                added, deleted = {}, []
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "file":
                        assert value["encoding"] == "base64"
                        added[value["path"]] = base64.b64decode(value["content"])
                    elif key == "deletedFile":
                        deleted.append(value["path"])
                    elif key != "header":
                        return self._error(400, None, f"unsupported commit operation {key!r}")
                sha = hub.commit(repo_id, added, tuple(deleted))
                return self._json(
                    200,
                    {
                        "success": True,
                        "commitOid": sha,
                        "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                        "pullRequestUrl": None,
                    },
                )

        return Handler


class HubEnv:
    """The fake Hub plus switches for ``huggingface_hub``'s offline mode."""

    def __init__(self, hub: FakeHub, monkeypatch, cache: Path):
        self.hub = hub
        self._monkeypatch = monkeypatch
        self.cache = cache

    def set_offline(self, offline: bool, variable: str = "HF_HUB_OFFLINE") -> None:
        """Offline mode as huggingface_hub sets it at import: from HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE."""
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            self._monkeypatch.delenv(name, raising=False)
        if offline:
            self._monkeypatch.setenv(variable, "1")
        self._monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
        reset_sessions()  # sessions are cached per thread with the offline adapter mounted or not

    def use_cache(self, cache: Path) -> None:
        self.cache = cache
        self._monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        self._monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub()
    home = tmp_path / "hf_home"
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf_file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.chdir(tmp_path)  # "user/repo" must not exist as a local folder
    env = HubEnv(server, monkeypatch, home / "hub")
    env.use_cache(home / "hub")
    env.set_offline(False)
    try:
        yield env
    finally:
        server.stop()
        monkeypatch.undo()
        reset_sessions()  # drop the online sessions: later tests get the offline setup back


# --------------------------------------------------------------------------- models


def _lora_model(flax_model, targets=("q_proj", "v_proj"), seed=1):
    model = jpeft.get_peft_model(
        flax_model, jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
    )
    parity.perturb_jpeft_adapter(model, seed=seed)
    return model


@pytest.fixture(scope="module")
def llama(tiny):
    pair = tiny("llama")
    return pair, _lora_model(pair.flax_model)


def _logits(model, inputs, **kwargs) -> np.ndarray:
    return np.asarray(model(**inputs, **kwargs).logits)


def _push(hub, model, repo_id="user/repo", **kwargs) -> str:
    url = model.push_to_hub(repo_id, **kwargs)
    assert repo_id in hub.hub.repos
    return url


# --------------------------------------------------------------------------- push


def test_push_to_hub_uploads_the_adapter_folder(hub, llama, tmp_path):
    pair, model = llama
    url = _push(hub, model)
    files = hub.hub.files("user/repo")
    assert set(files) == ADAPTER_FILES

    # Exactly what save_pretrained writes.
    model.save_pretrained(tmp_path / "local")
    for name in ADAPTER_FILES:
        assert files[name] == (tmp_path / "local" / name).read_bytes(), name
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    assert "library_name: peft" in files["README.md"].decode()

    sha = hub.hub.repos["user/repo"]["main"]
    assert sha in url and url.startswith(hub.hub.url)
    methods = [(m, unquote(urlparse(p).path)) for m, p, _ in hub.hub.requests]
    assert ("POST", "/api/repos/create") in methods
    assert ("POST", "/api/models/user/repo/commit/main") in methods
    assert hub.hub.create_payloads[0] == {"name": "repo", "organization": "user", "type": "model"}
    # Write calls carry the token from HF_TOKEN.
    for method, path, headers in hub.hub.requests:
        if method == "POST":
            assert headers.get("authorization") == f"Bearer {TOKEN}", path

    # Pushing again to the existing repo (exist_ok) adds a commit; private= and token= are passed on.
    _push(hub, _lora_model(pair.flax_model, seed=5), private=True, token="hf_explicit")
    assert hub.hub.create_payloads[-1]["private"] is True
    assert hub.hub.requests[-1][2]["authorization"] == "Bearer hf_explicit"
    assert len(hub.hub.repos["user/repo"]["commits"]) == 2
    assert hub.hub.files("user/repo")["adapter_model.safetensors"] != files["adapter_model.safetensors"]


# --------------------------------------------------------------------------- download


def test_from_pretrained_downloads_then_uses_the_cache_offline(hub, llama):
    pair, model = llama
    inputs = pair.inputs()
    expected = _logits(model, inputs)
    _push(hub, model)
    hub.hub.requests.clear()

    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo")
    np.testing.assert_array_equal(_logits(loaded, inputs), expected)
    assert loaded.peft_config["default"].inference_mode is True
    # Only the adapter's two files were fetched (no model card, nothing else).
    fetched = {p.rsplit("/", 1)[-1] for p in hub.hub.paths_requested() if "/resolve/" in p}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}
    assert (hub.cache / "models--user--repo").is_dir()

    # Offline, with the server gone: served from the cache.
    hub.hub.stop()
    hub.set_offline(True)
    again = jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo")
    np.testing.assert_array_equal(_logits(again, inputs), expected)


def test_load_adapter_from_hub(hub, llama):
    pair, model = llama
    inputs = pair.inputs()
    _push(hub, model)
    other = _lora_model(pair.flax_model, targets=("k_proj", "o_proj"), seed=2)
    other.load_adapter("user/repo", "pushed")
    assert sorted(other.adapters) == ["default", "pushed"]
    np.testing.assert_array_equal(
        np.asarray(other.apply(other.params, **inputs, active_adapters=["pushed"]).logits),
        _logits(model, inputs),
    )


def test_revision_is_passed_on(hub, llama):
    pair, model = llama
    inputs = pair.inputs()
    first_logits = _logits(model, inputs)
    _push(hub, model)
    first = hub.hub.repos["user/repo"]["main"]
    changed = _lora_model(pair.flax_model, seed=3)
    _push(hub, changed)
    assert hub.hub.repos["user/repo"]["main"] != first

    latest = jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo")
    np.testing.assert_array_equal(_logits(latest, inputs), _logits(changed, inputs))
    pinned = jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo", revision=first)
    np.testing.assert_array_equal(_logits(pinned, inputs), first_logits)
    with pytest.raises(jpeft.CheckpointError, match="user/repo"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo", revision="no-such-branch")


def test_subfolder_loads_a_non_default_adapter(hub, tiny):
    pair = tiny("llama")
    inputs = pair.inputs()
    model = _lora_model(pair.flax_model)
    model.add_adapter(
        "other",
        jpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"]),
        key=jax.random.key(3),
    )
    parity.perturb_jpeft_adapter(model, "other", seed=2)
    _push(hub, model, "user/multi")
    assert set(hub.hub.files("user/multi")) == ADAPTER_FILES | {
        "other/adapter_config.json",
        "other/adapter_model.safetensors",
    }
    hub.hub.requests.clear()

    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, "user/multi", subfolder="other")
    expected = np.asarray(model.apply(model.params, **inputs, active_adapters=["other"]).logits)
    np.testing.assert_array_equal(_logits(loaded, inputs), expected)
    assert loaded.targeted_modules() == model.targeted_modules("other")
    fetched = {
        p.split("/resolve/", 1)[1].split("/", 1)[1] for p in hub.hub.paths_requested() if "/resolve/" in p
    }
    assert fetched == {"other/adapter_config.json", "other/adapter_model.safetensors"}

    default = jpeft.PeftModel.from_pretrained(pair.flax_model, "user/multi")
    np.testing.assert_array_equal(_logits(default, inputs), _logits(model, inputs))


# --------------------------------------------------------------------------- errors


def test_offline_with_empty_cache_is_a_checkpoint_error(hub, llama):
    pair, model = llama
    _push(hub, model)
    hub.hub.requests.clear()
    hub.set_offline(True)
    with pytest.raises(jpeft.CheckpointError, match="(?i)offline") as info:
        jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo")
    assert "user/repo" in str(info.value)
    assert hub.hub.requests == []  # offline means no request at all


def test_unknown_repo_is_a_checkpoint_error(hub, llama):
    pair, _ = llama
    with pytest.raises(jpeft.CheckpointError, match="user/does-not-exist"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, "user/does-not-exist")
    assert any("/api/models/user/does-not-exist" in p for p in hub.hub.paths_requested())


class _Bomb:
    """Unpickling this creates ``path``: proof that someone ran the pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_only_repo_is_refused_without_downloading_it(hub, llama, tmp_path):
    pair, model = llama
    marker = tmp_path / "unpickled"
    model.save_pretrained(tmp_path / "local")
    config = (tmp_path / "local" / "adapter_config.json").read_bytes()
    hub.hub.create(
        "user/pickled", {"adapter_config.json": config, "adapter_model.bin": pickle.dumps(_Bomb(marker))}
    )

    with pytest.raises(jpeft.CheckpointError):
        jpeft.PeftModel.from_pretrained(pair.flax_model, "user/pickled")
    assert not marker.exists()
    assert not any(p.endswith("adapter_model.bin") for p in hub.hub.paths_requested())
    assert not list(hub.cache.rglob("adapter_model.bin"))


def test_pickle_only_repo_error_explains_the_refusal(hub, llama, tmp_path):
    pair, model = llama
    model.save_pretrained(tmp_path / "local")
    config = (tmp_path / "local" / "adapter_config.json").read_bytes()
    hub.hub.create("user/pickled", {"adapter_config.json": config, "adapter_model.bin": b"not loaded"})
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(pair.flax_model, "user/pickled")
    message = str(info.value)
    assert "user/pickled" in message and "adapter_model.bin" in message


def test_token_and_cache_dir_are_passed_on(hub, llama, tmp_path):
    pair, model = llama
    inputs = pair.inputs()
    _push(hub, model)
    hub.hub.requests.clear()
    cache = tmp_path / "own-cache"
    loaded = jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo", token="hf_reader", cache_dir=cache)
    np.testing.assert_array_equal(_logits(loaded, inputs), _logits(model, inputs))
    assert (cache / "models--user--repo").is_dir()
    assert not (hub.cache / "models--user--repo").exists()
    assert hub.hub.requests and all(
        h.get("authorization") == "Bearer hf_reader" for _, _, h in hub.hub.requests
    )


def test_offline_through_transformers_offline_is_reported_as_offline(hub, llama):
    pair, _ = llama
    hub.set_offline(True, variable="TRANSFORMERS_OFFLINE")
    with pytest.raises(jpeft.CheckpointError, match="(?i)offline"):
        jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo")
    assert hub.hub.requests == []


def test_unreachable_endpoint_is_a_checkpoint_error(hub, llama):
    pair, model = llama
    _push(hub, model)
    hub.hub.stop()  # the endpoint now refuses connections; offline mode stays off
    with pytest.raises(jpeft.CheckpointError) as info:
        jpeft.PeftModel.from_pretrained(pair.flax_model, "user/repo")
    message = str(info.value)
    assert "user/repo" in message
    assert "HF_HUB_OFFLINE" not in message  # offline mode is not what went wrong


def test_push_to_unreachable_endpoint_fails_cleanly(hub, llama):
    """Uploads raise huggingface_hub's (requests') connection error, promptly."""
    _, model = llama
    hub.hub.stop()
    with pytest.raises(OSError):  # requests' ConnectionError
        model.push_to_hub("user/repo")
