"""A small Hugging Face Hub-compatible HTTP server for the hub tests.

It speaks the subset of the Hub API that ``huggingface_hub`` uses to create model repos, commit
(regular files inline, large files through the Git LFS batch API with basic PUT transfers),
branch, tag, list and download. Blobs are stored on disk by sha256 under ``root/blobs`` (so a test
can tamper with one); repos, commits and refs live in memory. Errors carry ``X-Error-Code``
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) the way the Hub does.

Optional tokens: ``tokens={"hf_w": "write", "hf_r": "read"}`` makes every write need a
``write`` token (no/unknown token -> 401, read token -> 403) and private repos need any known token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".onnx", ".pt", ".bin", ".gguf", ".npy")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str = ""  # git blob id of the content (regular files only)

    @property
    def oid(self) -> str:
        """The git blob id the Hub reports (of the pointer file for LFS entries)."""
        if self.lfs:
            return git_blob_oid(lfs_pointer(self.sha256, self.size))
        return self.git_oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    date: float


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return rev
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.extra = extra or {}


class HubServer:
    """Start with ``with HubServer(tmp_path) as hub: HfApi(endpoint=hub.url)``."""

    def __init__(self, root: str | Path, tokens: dict[str, str] | None = None):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs_uploads: list[str] = []  # sha256 of every blob PUT, in order
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._lock = threading.RLock()
        self._connections: set = set()  # open keep-alive sockets, closed by stop()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, and drop open keep-alive connections so the server is really gone."""
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test helpers -------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def branch_head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def n_commits(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    def file_entry(self, repo_id: str, path: str, revision: str = "main") -> Entry:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)].files[path]

    # ---- storage ------------------------------------------------------------------------------
    def _put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, Entry], title: str) -> Commit:
        self._counter += 1
        payload = json.dumps([repo.repo_id, parent, sorted((p, e.sha256) for p, e in files.items()), title, self._counter])
        sha = hashlib.sha1(payload.encode()).hexdigest()
        commit = Commit(sha=sha, parent=parent, files=files, title=title, date=time.time())
        repo.commits[sha] = commit
        return commit

    def _check_token(self, headers, *, write: bool, repo: Repo | None = None) -> None:
        if self.tokens is None:
            return
        auth = headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        role = self.tokens.get(token) if token else None
        if write:
            if role is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            if role != "write":
                raise HubError(403, "You don't have the rights to write to this repo")
        elif repo is not None and repo.private and role is None:
            raise HubError(404, "Repository not found", "RepoNotFound")

    def _repo(self, repo_id: str, headers, *, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            if self.tokens is not None and write:
                self._check_token(headers, write=True)
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        self._check_token(headers, write=write, repo=repo)
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        sha = repo.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    # ---- API handlers (each returns (status, json_or_bytes, extra_headers)) -------------------
    def create_repo(self, body: dict, headers) -> tuple:
        self._check_token(headers, write=True)
        if body.get("type", "model") != "model":
            raise HubError(400, "only model repos are supported by this test server")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
            private = body.get("visibility", "public") == "private" or bool(body.get("private"))
            repo = Repo(repo_id=repo_id, private=private)
            sha = self._put_blob(GITATTRIBUTES)
            files = {".gitattributes": Entry(sha, len(GITATTRIBUTES), False, git_blob_oid(GITATTRIBUTES))}
            repo.branches["main"] = self._new_commit(repo, None, files, "initial commit").sha
            self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def repo_info(self, repo: Repo, rev: str) -> tuple:
        commit = self._commit(repo, rev)
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        info = {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "private": repo.private,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
            "tags": [],
            "siblings": siblings,
        }
        return 200, info, {}

    def tree(self, repo: Repo, rev: str, path: str, recursive: bool) -> tuple:
        commit = self._commit(repo, rev)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", commit.sha)
        out: dict[str, dict] = {}
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            depth = len(rest) if recursive else 1
            for i in range(1, min(depth, len(rest))):  # folders on the way
                folder = prefix + "/".join(rest[:i])
                out.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
            if len(rest) == 1 or recursive:
                e = commit.files[p]
                item = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
                out[p] = item
        return 200, list(out.values()), {}

    def refs(self, repo: Repo) -> tuple:
        def fmt(kind: str, items: dict) -> list:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(items.items())]

        return 200, {"branches": fmt("heads", repo.branches), "converts": [], "tags": fmt("tags", repo.tags), "pullRequests": []}, {}

    def preupload(self, repo: Repo, rev: str, body: dict) -> tuple:
        commit = self._commit(repo, rev)
        files = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or f["size"] > 10_000_000
            remote = commit.files.get(f["path"])
            oid = None
            if remote is not None:
                oid = remote.sha256 if remote.lfs else remote.git_oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": commit.sha}, {}

    def lfs_batch(self, repo: Repo, body: dict) -> tuple:
        if body.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for obj in body["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.blob_path(obj["oid"]).exists():
                item["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo.repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(item)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def lfs_put(self, oid: str, data: bytes) -> tuple:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        with self._lock:
            self._put_blob(data)
            self.lfs_uploads.append(oid)
        return 200, {}, {}

    def lfs_verify(self, body: dict) -> tuple:
        path = self.blob_path(body["oid"])
        if not path.exists() or path.stat().st_size != body["size"]:
            raise HubError(404, f"object {body['oid']} not found")
        return 200, {"message": "verified"}, {}

    def commit(self, repo: Repo, rev: str, lines: list[dict]) -> tuple:
        with self._lock:
            if rev not in repo.branches:
                raise HubError(404, f"Invalid rev id: {rev} (commits go to branches)", "RevisionNotFound")
            head = repo.commits[repo.branches[rev]]
            files = dict(head.files)
            title = "commit"
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    title = value.get("summary") or title
                    parent = value.get("parentCommit")
                    if parent and parent != head.sha:
                        raise HubError(412, "parent commit is not the head of the branch")
                elif key == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = Entry(self._put_blob(data), len(data), False, git_blob_oid(data))
                elif key == "lfsFile":
                    if not self.blob_path(value["oid"]).exists():
                        raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    size = value.get("size", self.blob_path(value["oid"]).stat().st_size)
                    files[value["path"]] = Entry(value["oid"], size, True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound", head.sha)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"unknown commit operation {key}")
            commit = self._new_commit(repo, head.sha, files, title)
            repo.branches[rev] = commit.sha
        body = {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.sha}", "commitOid": commit.sha, "success": True}
        return 200, body, {}

    def create_branch(self, repo: Repo, branch: str, body: dict) -> tuple:
        with self._lock:
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = body.get("startingPoint") or "main"
            repo.branches[branch] = self._commit(repo, start).sha
        return 200, {}, {}

    def create_tag(self, repo: Repo, rev: str, body: dict) -> tuple:
        with self._lock:
            tag = body["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._commit(repo, rev).sha
        return 200, {}, {}

    def validate_yaml(self, body: dict) -> tuple:
        content = body.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        if match is None:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, {}
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}, {}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def resolve_file(self, repo: Repo, rev: str, path: str, range_header: str | None) -> tuple:
        commit = self._commit(repo, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.sha)
        data = self.blob_path(entry.sha256).read_bytes()
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"ETag": f'"{entry.sha256}"', "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        else:
            headers["ETag"] = f'"{entry.git_oid}"'
        status = 200
        if range_header:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
        return status, data, headers


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def setup(self) -> None:
            super().setup()
            hub._connections.add(self.connection)

        def finish(self) -> None:
            hub._connections.discard(self.connection)
            super().finish()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload, headers: dict, head: bool = False) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            if not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            segs = [unquote(s) for s in url.path.split("/")[1:]]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            hub.requests.append((method, url.path))
            body = self._body() if method in ("POST", "PUT") else b""
            try:
                status, payload, headers = self._route(method, segs, query, body)
            except HubError as e:
                headers = {"X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                if e.commit:
                    headers["X-Repo-Commit"] = e.commit
                status, payload = e.status, {"error": e.message, **e.extra}
            self._send(status, payload, headers, head=method == "HEAD")

        def _route(self, method: str, s: list[str], q: dict, body: bytes) -> tuple:
            h = self.headers
            js = (lambda: json.loads(body or b"{}"))
            if s[:3] == ["api", "repos", "create"] and method == "POST":
                return hub.create_repo(js(), h)
            if s[:2] == ["api", "validate-yaml"] and method == "POST":
                return hub.validate_yaml(js())
            if len(s) >= 4 and s[:2] == ["api", "models"]:
                repo = hub._repo(f"{s[2]}/{s[3]}", h, write=method == "POST")
                rest = s[4:]
                if not rest and method in ("GET", "HEAD"):
                    return hub.repo_info(repo, "main")
                if rest[:1] == ["revision"] and method in ("GET", "HEAD"):
                    return hub.repo_info(repo, "/".join(rest[1:]))
                if rest[:1] == ["tree"] and method == "GET":
                    return hub.tree(repo, rest[1], "/".join(rest[2:]), q.get("recursive", "").lower() == "true")
                if rest == ["refs"] and method == "GET":
                    return hub.refs(repo)
                if rest[:1] == ["preupload"] and method == "POST":
                    return hub.preupload(repo, "/".join(rest[1:]), js())
                if rest[:1] == ["commit"] and method == "POST":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    return hub.commit(repo, "/".join(rest[1:]), lines)
                if rest[:1] == ["branch"] and method == "POST":
                    return hub.create_branch(repo, "/".join(rest[1:]), js())
                if rest[:1] == ["tag"] and method == "POST":
                    return hub.create_tag(repo, "/".join(rest[1:]), js())
            if len(s) >= 2 and s[0] == "lfs-objects" and method == "PUT":
                return hub.lfs_put(s[1], body)
            if len(s) == 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
                repo = hub._repo(f"{s[0]}/{s[1][:-4]}", h, write=True)
                if s[5] == "batch":
                    return hub.lfs_batch(repo, js())
                if s[5] == "verify":
                    return hub.lfs_verify(js())
            if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
                repo = hub._repo(f"{s[0]}/{s[1]}", h)
                return hub.resolve_file(repo, s[3], "/".join(s[4:]), h.get("Range"))
            raise HubError(404, f"no route for {method} /{'/'.join(s)}")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

    return Handler
