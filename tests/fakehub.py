"""Loopback test servers: a plain HTTP file server with Range support, and a fake Hugging Face Hub.

Both run in-process on 127.0.0.1 (port 0) in a daemon thread (``http.server.ThreadingHTTPServer``), record
every request, and inject faults on demand: an HTTP status, or a connection dropped after N body bytes.

``FakeHub`` answers what huggingface_hub 2.4 calls:

* downloads: ``HEAD|GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag`` (git sha1 of a
  regular file), and for LFS files a 302 to the file server (the "CDN") carrying ``X-Linked-Etag`` (the sha256)
  and ``X-Linked-Size``, as the real Hub redirects to its CDN; ``GET /api/models/{repo}[/revision/{rev}]``;
  ``GET /api/models/{repo}/tree/{rev}``. Errors carry the Hub's ``X-Error-Code`` (RepoNotFound,
  RevisionNotFound, EntryNotFound).
* uploads over the classic LFS path (huggingface_hub uses hf_xet instead unless ``HF_HUB_DISABLE_XET`` is on):
  ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/validate-yaml``,
  ``POST /api/models/{repo}/preupload/{rev}``, ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT`` of the
  object, ``POST`` verify, ``POST /api/models/{repo}/commit/{rev}`` (ndjson).

Usage::

    with FileServer() as cdn, FakeHub(cdn) as hub:
        hub.commit("owner/name", {"model.safetensors": data})
        hf_hub_download("owner/name", "model.safetensors", endpoint=hub.url, cache_dir=...)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


@dataclass
class Recorded:
    """One request as the server saw it (header names lower-cased, path without the query)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class _Fault:
    path_re: re.Pattern[str]
    method: str | None
    status: int | None
    drop_after: int | None
    remaining: int | None  # None = forever
    headers: dict[str, str]


def _json_reply(status: int, payload: object, headers: dict[str, str] | None = None) -> Reply:
    return Reply(
        status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()
    )


def _error(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> Reply:
    extra = dict(headers or {})
    if code:
        extra["X-Error-Code"] = code
    extra["X-Error-Message"] = message
    return _json_reply(status, {"error": message}, extra)


class LoopbackServer:
    """Base: the thread, the request log and fault injection. Subclasses implement ``handle``."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # A short poll interval makes shutdown (once per test) quick.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._running = False

    def start(self) -> LoopbackServer:
        self._thread.start()
        self._running = True
        return self

    def stop(self) -> None:
        """Shut down; later connections are refused."""
        if self._running:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._running = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail(
        self,
        path_pattern: str,
        status: int | None = None,
        *,
        drop_after: int | None = None,
        times: int | None = 1,
        method: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next ``times`` requests whose path matches the regex (``re.search``) get ``status``, or their
        response is cut after ``drop_after`` body bytes (headers still announce the full length).
        ``times=None`` keeps the fault forever."""
        if (status is None) == (drop_after is None):
            raise ValueError("give exactly one of status and drop_after")
        with self._lock:
            self._faults.append(
                _Fault(re.compile(path_pattern), method, status, drop_after, times, dict(headers or {}))
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests_matching(self, path_pattern: str, method: str | None = None) -> list[Recorded]:
        with self._lock:
            return [
                r
                for r in self.requests
                if re.search(path_pattern, r.path) and (method is None or r.method == method)
            ]

    def _record(self, request: Recorded) -> _Fault | None:
        with self._lock:
            self.requests.append(request)
            for fault in self._faults:
                if fault.method not in (None, request.method) or not fault.path_re.search(request.path):
                    continue
                if fault.remaining is not None:
                    if fault.remaining <= 0:
                        continue
                    fault.remaining -= 1
                return fault
        return None

    def handle(self, request: Recorded) -> Reply:
        raise NotImplementedError


def _make_handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            return None

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            request = Recorded(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self._read_body(),
            )
            fault = server._record(request)
            if fault is not None and fault.status is not None:
                reply = _error(fault.status, f"injected HTTP {fault.status}", headers=fault.headers)
            else:
                try:
                    reply = server.handle(request)
                except Exception as exc:  # a bug in the fake must show up as a 500, not a hung client
                    reply = _error(500, f"fake server error: {type(exc).__name__}: {exc}")
            self.send_response(reply.status)
            headers = dict(reply.headers)
            headers.setdefault("Content-Length", str(len(reply.body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault is not None and fault.drop_after is not None:
                self.wfile.write(reply.body[: fault.drop_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(reply.body)

        do_GET = do_HEAD = do_POST = do_PUT = _serve

    return Handler


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", value.strip())
    if match is None:
        return None
    start = int(match.group(1))
    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    return start, end


class FileServer(LoopbackServer):
    """Static files (``add(path, data)``) with HEAD, GET and single ``bytes=`` Range requests."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, tuple[bytes, str]] = {}
        self.honour_range = True  # False: answer every GET with the whole file, as some proxies do

    def add(self, path: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Serve ``data`` at ``path``; returns its URL."""
        with self._lock:
            self.files[path] = (data, content_type)
        return self.url + path

    def handle(self, request: Recorded) -> Reply:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "method not allowed")
        with self._lock:
            found = self.files.get(request.path)
        if found is None:
            return _error(404, f"no file at {request.path}")
        data, content_type = found
        headers = {"Content-Type": content_type, "Accept-Ranges": "bytes"}
        wanted = request.headers.get("range")
        span = _parse_range(wanted, len(data)) if wanted and self.honour_range else None
        if span is None:
            return Reply(200, headers, data)
        start, end = span
        if start >= len(data):
            return Reply(416, {"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Reply(206, headers, data[start : end + 1])


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


REPO_TYPES = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # type → URL prefix


def _key(repo_type: str, repo_id: str) -> str:
    """Repositories are stored under their URL path: ``owner/name``, ``datasets/owner/name``, ..."""
    return REPO_TYPES[repo_type] + repo_id


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag → commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit → {path: content}


class FakeHub(LoopbackServer):
    """An in-memory Hub. ``token``: when set, writes and private repositories need ``Bearer <token>``."""

    def __init__(self, cdn: FileServer, token: str | None = None) -> None:
        super().__init__()
        self.cdn = cdn
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 → content (uploaded, not yet committed)
        self._counter = 0

    # ----------------------------------------------------------------------------------------- test API

    def create_repo(self, repo_id: str, private: bool = False, repo_type: str = "model") -> FakeRepo:
        with self._lock:
            return self.repos.setdefault(_key(repo_type, repo_id), FakeRepo(repo_id, repo_type, private))

    def commit(
        self, repo_id: str, files: dict[str, bytes], branch: str = "main", repo_type: str = "model"
    ) -> str:
        """A new commit on ``branch`` adding/replacing ``files``; returns its 40-hex id."""
        repo = self.create_repo(repo_id, repo_type=repo_type)
        with self._lock:
            parent = repo.refs.get(branch)
            tree = dict(repo.commits.get(parent, {})) if parent else {}
            tree.update(files)
            self._counter += 1
            seed = f"{repo_id}|{branch}|{parent}|{self._counter}|" + "|".join(sorted(tree))
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = tree
            repo.refs[branch] = sha
        for path, data in files.items():
            if self.is_lfs(path):
                self.cdn.add(f"/lfs/{hashlib.sha256(data).hexdigest()}", data)
        return sha

    def tag(self, repo_id: str, tag: str, commit: str, repo_type: str = "model") -> None:
        with self._lock:
            self.repos[_key(repo_type, repo_id)].refs[tag] = commit

    def repo(self, repo_id: str, repo_type: str = "model") -> FakeRepo:
        return self.repos[_key(repo_type, repo_id)]

    def files_at(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repo(repo_id, repo_type)
        return dict(repo.commits[repo.refs.get(revision, revision)])

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.lower().endswith(LFS_SUFFIXES)

    # ----------------------------------------------------------------------------------------- routing

    def handle(self, request: Recorded) -> Reply:
        # Repositories are keyed by their URL path (see _key); route handlers get that key.
        segments = [unquote(s) for s in request.path.strip("/").split("/")]
        m = request.method
        prefix = segments[0] + "/" if segments[0] in ("datasets", "spaces") else ""
        in_repo = segments[1:] if prefix else segments  # /{prefix}{owner}/{name}/...
        if len(in_repo) >= 5 and in_repo[2] == "resolve" and m in ("GET", "HEAD"):
            key = prefix + "/".join(in_repo[:2])
            return self._resolve(request, key, in_repo[3], "/".join(in_repo[4:]))
        if (
            len(in_repo) == 6
            and in_repo[1].endswith(".git")
            and in_repo[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(request, f"{prefix}{in_repo[0]}/{in_repo[1][:-4]}")
        if segments[0] == "api" and len(segments) >= 4 and segments[1] in ("models", "datasets", "spaces"):
            kind = "" if segments[1] == "models" else segments[1] + "/"
            repo_id, rest = kind + "/".join(segments[2:4]), segments[4:]
            if not rest and m == "GET":
                return self._model_info(request, repo_id, "main")
            if rest[:1] == ["revision"] and len(rest) == 2 and m == "GET":
                return self._model_info(request, repo_id, rest[1])
            if rest[:1] == ["tree"] and len(rest) >= 2 and m == "GET":
                return self._tree(request, repo_id, rest[1], "/".join(rest[2:]))
            if rest[:1] == ["preupload"] and m == "POST":
                return self._preupload(request, repo_id, rest[1])
            if rest[:1] == ["commit"] and m == "POST":
                return self._commit(request, repo_id, "/".join(rest[1:]))
            if rest[:1] == ["branch"] and m == "POST":
                return self._branch(request, repo_id, "/".join(rest[1:]))
        if segments == ["api", "repos", "create"] and m == "POST":
            return self._create(request)
        if segments == ["api", "validate-yaml"] and m == "POST":
            return _json_reply(200, {"errors": [], "warnings": []})
        if segments[0] == "lfs-upload" and m == "PUT" and len(segments) == 2:
            return self._lfs_put(request, segments[1])
        if segments == ["lfs-verify"] and m == "POST":
            oid = json.loads(request.body)["oid"]
            return _json_reply(200 if oid in self.lfs_objects else 404, {})
        return _error(404, f"fake hub has no route for {m} {request.path}")

    # ----------------------------------------------------------------------------------------- helpers

    def _authorized(self, request: Recorded) -> bool:
        return self.token is None or request.headers.get("authorization") == f"Bearer {self.token}"

    def _repo(self, request: Recorded, repo_id: str) -> FakeRepo | Reply:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(request)):
            return _error(404 if repo is None else 401, "Repository not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: FakeRepo, revision: str) -> str | None:
        if revision in repo.refs:
            return repo.refs[revision]
        return revision if revision in repo.commits else None

    def _resolve(self, request: Recorded, repo_id: str, revision: str, path: str) -> Reply:
        repo = self._repo(request, repo_id)
        if isinstance(repo, Reply):
            return repo
        commit = self._commit_of(repo, revision)
        if commit is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        data = repo.commits[commit].get(path)
        if data is None:
            return _error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit})
        if self.is_lfs(path):
            sha256 = hashlib.sha256(data).hexdigest()
            return Reply(
                302,
                {
                    "Location": f"{self.cdn.url}/lfs/{sha256}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'W/"{git_blob_sha1(data)}"',
                },
            )
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Content-Type": "application/octet-stream",
        }
        return Reply(200, headers, data)

    def _model_info(self, request: Recorded, repo_id: str, revision: str) -> Reply:
        repo = self._repo(request, repo_id)
        if isinstance(repo, Reply):
            return repo
        commit = self._commit_of(repo, revision)
        if commit is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        siblings = [{"rfilename": path} for path in sorted(repo.commits[commit])]
        info = {"id": repo.repo_id, "sha": commit, "private": repo.private, "siblings": siblings}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return _json_reply(200, info)

    def _tree(self, request: Recorded, repo_id: str, revision: str, prefix: str) -> Reply:
        repo = self._repo(request, repo_id)
        if isinstance(repo, Reply):
            return repo
        commit = self._commit_of(repo, revision)
        if commit is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        entries = []
        for path, data in sorted(repo.commits[commit].items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if self.is_lfs(path):
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            entries.append(entry)
        return _json_reply(200, entries)

    def _create(self, request: Recorded) -> Reply:
        if not self._authorized(request):
            return _error(401, "Invalid credentials in Authorization header")
        payload = json.loads(request.body)
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        )
        repo_type = payload.get("type") or "model"
        if "/" not in repo_id or repo_type not in REPO_TYPES:
            return _error(400, "the fake hub needs an owner/name repo id of a known type")
        url = f"{self.url}/{_key(repo_type, repo_id)}"
        if (
            _key(repo_type, repo_id) in self.repos
        ):  # the real 409 carries the url too: huggingface_hub reads it
            return _json_reply(409, {"error": "You already created this repo", "url": url})
        private = payload.get("private") is True or payload.get("visibility") == "private"
        self.create_repo(repo_id, private=private, repo_type=repo_type)
        return _json_reply(200, {"url": url, "name": repo_id})

    def _branch(self, request: Recorded, repo_id: str, branch: str) -> Reply:
        repo = self._repo(request, repo_id)
        if isinstance(repo, Reply):
            return repo
        if not self._authorized(request):
            return _error(401, "Invalid credentials in Authorization header")
        if branch in repo.refs:
            return _error(409, "Reference already exists")
        with self._lock:
            if "main" in repo.refs:
                repo.refs[branch] = repo.refs["main"]
            else:  # an empty repo: the branch starts empty too
                repo.refs[branch] = hashlib.sha1(f"{repo_id}|{branch}|empty".encode()).hexdigest()
                repo.commits[repo.refs[branch]] = {}
        return _json_reply(200, {})

    def _preupload(self, request: Recorded, repo_id: str, revision: str) -> Reply:
        repo = self._repo(request, repo_id)
        if isinstance(repo, Reply):
            return repo
        commit = self._commit_of(repo, revision)
        existing = repo.commits.get(commit, {}) if commit else {}
        files = []
        for item in json.loads(request.body)["files"]:
            path = item["path"]
            old = existing.get(path)
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if self.is_lfs(path) else git_blob_sha1(old)
            mode = "lfs" if self.is_lfs(path) else "regular"
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json_reply(200, {"files": files})

    def _lfs_batch(self, request: Recorded, repo_id: str) -> Reply:
        repo = self._repo(request, repo_id)
        if isinstance(repo, Reply):
            return repo
        if not self._authorized(request):
            return _error(401, "Invalid credentials in Authorization header")
        objects = []
        for obj in json.loads(request.body)["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, object] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}"},
                    "verify": {"href": f"{self.url}/lfs-verify"},
                }
            objects.append(entry)
        return _json_reply(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, request: Recorded, oid: str) -> Reply:
        if hashlib.sha256(request.body).hexdigest() != oid:
            return _error(400, "uploaded content does not match its oid")
        with self._lock:
            self.lfs_objects[oid] = request.body
        return Reply(200)

    def _commit(self, request: Recorded, repo_id: str, revision: str) -> Reply:
        repo = self._repo(request, repo_id)
        if isinstance(repo, Reply):
            return repo
        if not self._authorized(request):
            return _error(401, "Invalid credentials in Authorization header")
        files: dict[str, bytes] = {}
        summary = ""
        for line in request.body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value.get("summary", "")
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None:
                    return _error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = data
            else:
                return _error(400, f"fake hub does not support commit operation {item['key']!r}")
        if not summary:
            return _error(400, "empty commit message")
        sha = self.commit(repo.repo_id, files, branch=revision or "main", repo_type=repo.repo_type)
        return _json_reply(
            200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}"}
        )
