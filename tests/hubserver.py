"""A local server speaking the part of the Hugging Face Hub API that `huggingface_hub`
uses to resolve a revision and download files, serving repos the tests build."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support import free_port, wait_for


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    token: str | None = None  # when set, the repo is private

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        sha = hashlib.sha1(repr(sorted(files.items())).encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/api/models/{owner}/{name}/revision/{revision:path}", self._info),
                Route("/{owner}/{name}/resolve/{revision}/{filename:path}", self._file, methods=["GET", "HEAD"]),
            ]
        )
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        wait_for(lambda: self._server.started, 30, "the hub server did not start", every_s=0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def _resolve(self, request: Request) -> tuple[Repo, str] | Response:
        p = request.path_params
        self.requests.append(f"{request.method} {request.url.path} auth={request.headers.get('authorization', '')}")
        repo = self.repos.get(f"{p['owner']}/{p['name']}")
        if repo is None or (repo.token and request.headers.get("authorization") != f"Bearer {repo.token}"):
            return JSONResponse({"error": "Repository not found"}, 404, headers={"X-Error-Code": "RepoNotFound"})
        revision = p["revision"]
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            return JSONResponse({"error": "Invalid rev id"}, 404, headers={"X-Error-Code": "RevisionNotFound"})
        return repo, sha

    async def _info(self, request: Request) -> Response:
        found = self._resolve(request)
        if isinstance(found, Response):
            return found
        repo, sha = found
        name = f"{request.path_params['owner']}/{request.path_params['name']}"
        files = repo.commits[sha]
        siblings = [{"rfilename": f, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()} for f, b in files.items()]
        return JSONResponse({"id": name, "modelId": name, "sha": sha, "siblings": siblings, "private": False})

    async def _file(self, request: Request) -> Response:
        found = self._resolve(request)
        if isinstance(found, Response):
            return found
        repo, sha = found
        data = repo.commits[sha].get(request.path_params["filename"])
        if data is None:
            return JSONResponse({"error": "Entry not found"}, 404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(len(data))})
        return Response(data, headers=headers, media_type="application/octet-stream")
