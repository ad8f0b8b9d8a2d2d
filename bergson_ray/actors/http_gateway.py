"""Optional HTTP endpoint of a query service (Ray Serve), for clients that are not Python.

``POST /<name>/query``            ``{"queries": ["text", ["prompt", "completion"]], "k": 10, "reverse": false}``
``POST /<name>/query_gradients``  ``{"gradients": [[...], ...], "k": 10, "reverse": false}``
``GET  /<name>/info``
``GET  /<name>/`` (or ``/<name>/ui``)  the web page (``bergson_ray/web``)

``/query`` with ``"tokens": true`` adds ``token_docs`` to each result: on per-token stores
the heat map of every matched document (``query/token_heat.py``), else ``[]``.

Every API request needs ``Authorization: Bearer <token>``. The deployment keeps only the
token's SHA-256 and compares digests in constant time. The page's static files hold no
data and are served without a token; the page asks for it and sends it with each call.
Ray's own ports (GCS, dashboard, object store) are *not* an authorization boundary:
anyone who can reach them can run code on the cluster, so keep them on loopback or a
private network. This endpoint is the only one meant to be exposed, and it binds to
127.0.0.1 unless told otherwise.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request``
# class in the signatures, or it takes ``request`` for a query parameter (HTTP 422).

import hashlib
import hmac
import logging

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from ray import serve

from ..errors import BergsonRayError
from ..query.client import user_error

log = logging.getLogger(__name__)

app = FastAPI(title="bergson_ray query service")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


WEB_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
WEB_HEADERS = {  # the page loads nothing but itself, and talks only to this service
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def web_file(name: str) -> Response:
    """One of the page's static files, read from the installed package."""
    from importlib.resources import files

    body = files("bergson_ray.web").joinpath(name).read_bytes()
    return Response(body, media_type=WEB_TYPES[name], headers=WEB_HEADERS)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(app)
class HttpGateway:
    def __init__(self, service: str, namespace: str, digest: str):
        self.service = service
        self.namespace = namespace
        self.digest = digest
        self._actor = None

    @property
    def actor(self):
        if self._actor is None:
            self._actor = ray.get_actor(self.service, namespace=self.namespace)
        return self._actor

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(token_digest(token.strip()), self.digest)

    async def _call(self, request: Request, method: str, arg_key: str):
        if not self._authorized(request):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        if not isinstance(body, dict) or arg_key not in body:
            return JSONResponse({"error": f"the JSON body needs {arg_key!r}"}, status_code=400)
        arg = body[arg_key]
        if method == "query_gradients":
            import numpy as np

            try:
                arg = np.asarray(arg, dtype=np.float32)
            except (TypeError, ValueError):
                return JSONResponse(
                    {"error": "gradients must be a list of number lists"}, status_code=400
                )
        if method == "query" and isinstance(arg, list):
            arg = [tuple(q) if isinstance(q, list) else q for q in arg]
        if method == "query" and body.get("tokens"):
            method = "query_tokens"
        try:
            k = body.get("k", 10)
            reverse = bool(body.get("reverse", False))
            results = await getattr(self.actor, method).remote(arg, k, reverse)
        except Exception as exc:  # noqa: BLE001 - user errors -> 400, the rest -> 500
            err = user_error(exc)
            if isinstance(err, BergsonRayError):
                return JSONResponse({"error": str(err)}, status_code=400)
            log.exception("query failed")
            return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)
        if method == "query_tokens":
            results, heat = results
            return {"results": [{**r.to_dict(), "token_docs": h} for r, h in zip(results, heat)]}
        return {"results": [r.to_dict() for r in results]}

    @app.post("/query")
    async def query(self, request: Request):
        return await self._call(request, "query", "queries")

    @app.post("/query_gradients")
    async def query_gradients(self, request: Request):
        return await self._call(request, "query_gradients", "gradients")

    @app.get("/info")
    async def info(self, request: Request):
        if not self._authorized(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        return await self.actor.info.remote()

    @app.get("/")
    async def page(self, request: Request):
        if not request.url.path.endswith("/"):  # relative links need the trailing slash
            return RedirectResponse(request.url.path + "/", status_code=308)
        return web_file("index.html")

    @app.get("/ui")
    async def page_ui(self):
        return web_file("index.html")

    @app.get("/app.js")
    async def page_js(self):
        return web_file("app.js")

    @app.get("/style.css")
    async def page_css(self):
        return web_file("style.css")
