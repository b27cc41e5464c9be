"""The HTTP front: a FastAPI app per ``Ingress`` replica, and the typed client it calls the Recommender
deployment through.

``make_api(backend, max_body_bytes, metrics)`` builds the app: routes, body-size limit (413), request
metrics, and the error mapping (every error is a JSON ``{"error": <code>, "detail": <message>, ...}``).
Everything the app needs is passed in; nothing is kept at module level. ``backend`` is anything with the
``Backend`` methods: the ``RecommenderClient`` in production (reads re-sent to another replica when the
one picked dies), a fake in unit tests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics as serve_metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidrec.serve.coalesce import Coalescer
from sidrec.serve.schemas import (
    AddItemsRequest,
    AddItemsResponse,
    CatalogVersion,
    ErrorBody,
    ItemInfo,
    RecommendRequest,
    RecommendResponse,
    RetireRequest,
    RetireResponse,
    SearchRequest,
    SearchResponse,
    error,
    is_error,
)
from sidrec.serve.settings import MAX_BATCH_SIZE, ServeAppConfig
from sidrec.serve.ui import page_html
from sidrec.serve.ui.listing import (
    MAX_ITEMS_PAGE,
    MAX_QUERY_CHARS,
    MAX_USERS_PAGE,
    ItemsResponse,
    UsersResponse,
)

log = logging.getLogger("ray.serve")

Reply = dict[str, Any]
DEFAULTS = ServeAppConfig()
# most /v1/recommend bodies in one coalesced call: one replica batch, so no body waits for a second batch
COALESCE_MAX = MAX_BATCH_SIZE
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (413, 422, 503)}
# the demo page may run its own inline code and call this origin, and load nothing from anywhere else
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DESCRIPTION = ("Generative recommendation with Semantic IDs: a causal LM decodes item SIDs under a prefix-tree "
               "constraint, so every answer is a real catalog item.")


class Backend(Protocol):
    """What the HTTP app calls: the Recommender deployment's methods, each returning a reply dict."""

    async def recommend(self, request: dict[str, Any]) -> Reply: ...

    async def search(self, request: dict[str, Any]) -> Reply: ...

    async def item(self, item_id: str) -> Reply: ...

    async def add_items(self, items: list[dict[str, Any]], api_key: str | None) -> Reply: ...

    async def retire_items(self, item_ids: list[str], api_key: str | None) -> Reply: ...

    async def catalog_version(self) -> Reply: ...

    async def health(self) -> Reply: ...

    async def users(self, limit: int, offset: int) -> Reply: ...

    async def list_items(self, q: str, limit: int) -> Reply: ...


# ============================================================================================ client
class RecommenderClient:
    """Typed calls on the Recommender deployment's handle. Reads are re-sent (``retries`` times) when the
    replica picked dies mid-request (a coalesced group is re-sent whole); an unavailable deployment is a 503
    reply."""

    def __init__(self, handle: DeploymentHandle, retries: int = DEFAULTS.retries, coalesce_in_flight: int = 0):
        self._handle = handle
        self._retries = retries
        # with coalesce_in_flight > 0, /v1/recommend bodies that wait together leave in one recommend_many call
        self._group = (Coalescer(self.recommend_many, COALESCE_MAX, coalesce_in_flight)
                       if coalesce_in_flight else None)

    async def recommend(self, request: dict[str, Any]) -> Reply:
        if self._group is not None:
            return await self._group(request)
        return await self._call(lambda: self._handle.recommend.remote(request))

    async def recommend_many(self, requests: list[dict[str, Any]]) -> list[Reply]:
        """Several /v1/recommend bodies in one call (one replica decodes them together)."""
        out = await self._call(lambda: self._handle.recommend_many.remote(requests))
        return [out] * len(requests) if is_error(out) else out

    async def search(self, request: dict[str, Any]) -> Reply:
        return await self._call(lambda: self._handle.search.remote(request))

    async def item(self, item_id: str) -> Reply:
        return await self._call(lambda: self._handle.item.remote(item_id))

    # catalog writes are idempotent (the same text is "unchanged", a retired item stays retired), so a
    # write whose replica died mid-request is re-sent like a read: it was either published or not at all
    async def add_items(self, items: list[dict[str, Any]], api_key: str | None) -> Reply:
        return await self._call(lambda: self._handle.add_items.remote(items, api_key=api_key))

    async def retire_items(self, item_ids: list[str], api_key: str | None) -> Reply:
        return await self._call(lambda: self._handle.retire_items.remote(item_ids, api_key=api_key))

    async def catalog_version(self) -> Reply:
        return await self._call(lambda: self._handle.catalog_version.remote())

    async def health(self) -> Reply:
        return await self._call(lambda: self._handle.health.remote())

    async def users(self, limit: int, offset: int) -> Reply:
        return await self._call(lambda: self._handle.users.remote(limit, offset))

    async def list_items(self, q: str, limit: int) -> Reply:
        return await self._call(lambda: self._handle.list_items.remote(q, limit))

    async def _call(self, send: Callable[[], Awaitable[Reply]], idempotent: bool = True) -> Reply:
        attempts = 1 + (self._retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return await send()
            except (RayActorError, ReplicaUnavailableError) as e:
                if attempt + 1 == attempts:
                    return error(503, "unavailable", f"the recommender replica failed ({type(e).__name__}); retry")
            except (BackPressureError, DeploymentUnavailableError) as e:
                return error(503, "unavailable", f"the recommender is unavailable ({type(e).__name__}); retry")
        raise AssertionError("unreachable")


# ========================================================================================= middleware
async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodySizeLimit:
    """413 for request bodies over ``max_bytes`` (declared by Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await send_json(send, 400, {"error": "bad_request", "detail": "invalid Content-Length"})
            if size > self.max_bytes:
                return await self._too_large(send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await send_json(send, 413, {"error": "body_too_large", "detail": f"request body exceeds {self.max_bytes} "
                                    "bytes", "max_body_bytes": self.max_bytes})


class HttpMetrics:
    """``sidrec_http_requests`` and ``sidrec_http_request_seconds``, by route template, method, status."""

    def __init__(self) -> None:
        tags = ("route", "method", "status")
        self.count = serve_metrics.Counter("sidrec_http_requests", description="HTTP requests by route and status",
                                           tag_keys=tags)
        self.latency = serve_metrics.Histogram("sidrec_http_request_seconds", description="HTTP request latency",
                                               boundaries=LATENCY_BUCKETS_S, tag_keys=tags)

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        tags = {"route": route, "method": method, "status": str(status)}
        self.count.inc(tags=tags)
        self.latency.observe(seconds, tags=tags)


class RequestMetrics:
    """Counts and times every HTTP request (413s included), tagged with the route template."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics | None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.metrics is None:
            return await self.app(scope, receive, send)
        status = [500]
        t0 = time.perf_counter()

        async def send_status(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.record(route, scope.get("method", ""), status[0], time.perf_counter() - t0)


# ============================================================================================ the app
def reply(out: Reply) -> Any:
    """A replica's reply as the HTTP response: error replies become JSON with their status."""
    if is_error(out):
        return JSONResponse(status_code=out["status"], content=out["error"])
    return out


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:10])
    return JSONResponse(status_code=422, content=jsonable_encoder(
        {"error": "invalid_request", "detail": detail or "invalid request", "errors": errors[:50]}))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
    return JSONResponse(status_code=exc.status_code, headers=getattr(exc, "headers", None),
                        content={"error": codes.get(exc.status_code, f"http_{exc.status_code}"),
                                 "detail": str(exc.detail)})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("sidrec: unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={"error": "internal_error", "detail": f"{type(exc).__name__}; "
                                                  "see the ingress log"})


def make_api(backend: Backend, max_body_bytes: int = DEFAULTS.max_body_bytes,
             metrics: HttpMetrics | None = None) -> FastAPI:
    """The FastAPI app of one ingress replica, calling ``backend``."""
    api = FastAPI(title="sidrec", version="1", description=DESCRIPTION)
    api.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    api.add_middleware(RequestMetrics, metrics=metrics)  # added last = outermost: sees the 413s too
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _internal_error)
    _add_routes(api, backend)
    _add_demo_routes(api, backend)
    return api


def _add_routes(api: FastAPI, backend: Backend) -> None:
    @api.post("/v1/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(body: RecommendRequest) -> Any:
        """Top-k next items for a history (oldest first) and/or a profile."""
        return reply(await backend.recommend(body.to_request()))

    @api.get("/v1/items/{item_id}", response_model=ItemInfo, responses={404: {"model": ErrorBody}})
    async def get_item(item_id: str) -> Any:
        """Title and SID of a present item (404 ``retired_item`` for a retired one)."""
        return reply(await backend.item(item_id))

    @api.post("/v1/items/search", response_model=SearchResponse, responses=ERRORS)
    async def search_items(body: SearchRequest) -> Any:
        """Items for a title, decoded by the model's title->SID task (constrained: real items only)."""
        return reply(await backend.search(body.model_dump()))

    admin_errors = {**ERRORS, **{s: {"model": ErrorBody} for s in (401, 403, 404, 409)}}

    @api.post("/v1/items", response_model=AddItemsResponse, responses=admin_errors)
    async def add_items(body: AddItemsRequest, x_api_key: str | None = Header(None)) -> Any:
        """Admin: add or update items (a known id with new text gets a new SID). Answers once the change is
        durable in the store's catalog log; every replica applies it within catalog_poll_s."""
        return reply(await backend.add_items([i.model_dump() for i in body.items], x_api_key))

    @api.post("/v1/items/retire", response_model=RetireResponse, responses=admin_errors)
    async def retire_items(body: RetireRequest, x_api_key: str | None = Header(None)) -> Any:
        """Admin: retire items: no replica recommends them again (durable, like POST /v1/items)."""
        return reply(await backend.retire_items(body.ids(), x_api_key))

    @api.get("/v1/catalog/version", response_model=CatalogVersion, responses={503: {"model": ErrorBody}})
    async def catalog_version() -> Any:
        """The store's catalog version and the one the answering replica has applied."""
        return reply(await backend.catalog_version())

    @api.get("/healthz")
    async def healthz() -> Any:
        """Model version and state of one Recommender replica."""
        out = await backend.health()
        if is_error(out):
            return reply(out)
        return JSONResponse(status_code=200 if out["status"] == "ok" else 503, content=out)


def _add_demo_routes(api: FastAPI, backend: Backend) -> None:
    """The demo page and the two listings it needs (users to pick, titles to search)."""

    @api.get("/v1/users", response_model=UsersResponse, responses={422: {"model": ErrorBody},
                                                                  503: {"model": ErrorBody}})
    async def list_users(limit: int = Query(20, ge=1, le=MAX_USERS_PAGE), offset: int = Query(0, ge=0)) -> Any:
        """Test users of the served store (the history before their held-out item), in split order."""
        return reply(await backend.users(limit, offset))

    @api.get("/v1/items", response_model=ItemsResponse, responses={422: {"model": ErrorBody},
                                                                  503: {"model": ErrorBody}})
    async def list_items(q: str = Query("", max_length=MAX_QUERY_CHARS),
                         limit: int = Query(20, ge=1, le=MAX_ITEMS_PAGE)) -> Any:
        """Live catalog items whose title contains ``q`` (case-insensitive; added items included, retired
        ones not): a substring match, unlike the model's title->SID search."""
        return reply(await backend.list_items(q, limit))

    @api.get("/ui", name="demo_page", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> HTMLResponse:
        """The demo page: static, self-contained; it calls this API like any client."""
        return HTMLResponse(page_html(), headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @api.get("/", include_in_schema=False)
    async def root(request: Request) -> RedirectResponse:
        return RedirectResponse(str(request.url_for("demo_page")), status_code=307)


# ============================================================================================ ingress
@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Ingress:
    """HTTP front: validates bodies, calls the Recommender deployment, maps errors to 4xx/503 JSON. Each
    replica builds its own app (``__serve_build_asgi_app__``) from its constructor arguments.

    /v1/recommend bodies are coalesced without waiting: while ``coalesce_in_flight`` calls are out to the
    Recommender, new bodies queue here and leave together in the next call (at low load each leaves alone at
    once); a replica decodes whatever queued behind its current batch, up to its ``max_batch_size``, as the
    next batch. With ``coalesce_in_flight=0`` every body is its own call, batched by the Recommender's
    ``@serve.batch``."""

    def __init__(self, recommender: DeploymentHandle, max_body_bytes: int = DEFAULTS.max_body_bytes,
                 retries: int = DEFAULTS.retries, coalesce_in_flight: int = DEFAULTS.coalesce_in_flight):
        self._client = RecommenderClient(recommender, retries, coalesce_in_flight)
        self._max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self._client, self._max_body_bytes, HttpMetrics())
