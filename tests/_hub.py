"""A loopback stand-in for the Hugging Face Hub's upload API, as huggingface-hub calls it:

    POST /api/repos/create                          {"name", "organization", "private", "type"}
    POST /api/models/{repo}/preupload/{revision}    which files go inline ("regular")
    POST /api/models/{repo}/commit/{revision}       NDJSON: a header, then each file, base64
    POST /api/validate-yaml                         the model card's metadata block
    GET  /api/agent-harnesses                       huggingface-hub's user-agent registry

    with HubStandIn() as hub:             # a background thread; hub.url for HF_ENDPOINT
        ...
        hub.repos["user/name"]            # {"private": bool, "files": {path: bytes}, "commits"}

Every request must carry the bearer token `TOKEN`; anything else gets the Hub's 401 shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading

from aiohttp import web

TOKEN = "hf_standin_token"


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[str] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 30)
        app.router.add_post("/api/repos/create", self._create)
        app.router.add_get("/api/agent-harnesses", self._harnesses)
        app.router.add_post("/api/validate-yaml", self._validate_yaml)
        app.router.add_post("/api/models/{ns}/{name}/preupload/{rev}", self._preupload)
        app.router.add_post("/api/models/{ns}/{name}/commit/{rev}", self._commit)
        runner = web.AppRunner(app, handle_signals=False)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        self.requests.append(f"{request.method} {request.path}")
        if request.path == "/api/agent-harnesses":  # public
            return await handler(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "Invalid credentials in Authorization header"},
                                     status=401)  # fmt: skip
        return await handler(request)

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        repo = f"{body.get('organization') or 'user'}/{body['name']}"
        if repo in self.repos:
            return web.json_response({"error": "You already created this model repo"},
                                     status=409)  # fmt: skip
        private = body.get("private") or body.get("visibility") == "private"
        self.repos[repo] = {"private": bool(private), "files": {}, "commits": []}
        return web.json_response({"url": f"{self.url}/{repo}", "name": repo})

    async def _harnesses(self, request: web.Request) -> web.Response:
        """huggingface-hub's registry of AI agents (for its user agent): none here."""
        return web.json_response({"standardEnvVars": [], "harnesses": {}})

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        """The card's metadata must be a YAML mapping, with the Hub's types for the keys the
        Hub reads (string base_model and library_name, a list of string tags)."""
        import yaml

        text = (await request.json())["content"]
        errors = []
        if text.startswith("---\n"):
            try:
                meta = yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}
            except (yaml.YAMLError, ValueError) as e:
                meta, errors = {}, [str(e)]
            if not isinstance(meta, dict):
                errors.append("metadata must be a mapping")
            else:
                for key in ("base_model", "library_name"):
                    if key in meta and not isinstance(meta[key], str):
                        errors.append(f"{key} must be a string")
                if not all(isinstance(t, str) for t in meta.get("tags", [])):
                    errors.append("tags must be strings")
        if errors:
            return web.json_response({"errors": [{"message": m} for m in errors]}, status=400)
        return web.json_response({"warnings": []})

    def _repo(self, request: web.Request) -> dict | None:
        return self.repos.get(f"{request.match_info['ns']}/{request.match_info['name']}")

    async def _preupload(self, request: web.Request) -> web.Response:
        if self._repo(request) is None:
            return web.json_response({"error": "Repository not found"}, status=404)
        body = await request.json()
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                 for f in body["files"]]  # fmt: skip
        return web.json_response({"files": files, "commitOid": "0" * 40})

    async def _commit(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if repo is None:
            return web.json_response({"error": "Repository not found"}, status=404)
        header, files = None, {}
        for line in (await request.text()).splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                value = item["value"]
                files[value["path"]] = base64.b64decode(value["content"])
            else:
                return web.json_response({"error": f"unexpected {item['key']}"}, status=400)
        repo["files"].update(files)
        repo["commits"].append(header["summary"] if header else "")
        oid = f"{len(repo['commits']):040x}"
        name = f"{request.match_info['ns']}/{request.match_info['name']}"
        return web.json_response({"commitUrl": f"{self.url}/{name}/commit/{oid}",
                                  "commitOid": oid, "pullRequestUrl": None})  # fmt: skip
