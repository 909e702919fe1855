"""The HTTP ingress (FastAPI, OpenAPI docs at /docs) and the application builder.

    POST /recommend  {history, k, critique?, exclude_history?} -> items (idx, id, title, score), model version
    POST /search     {query, k}                                 -> items by BM25 over the item texts
    POST /items      {items: [{item_id, title, text?, ...}]}    -> add new items / update known ones
    GET  /healthz    every deployment answers                   GET /version  model, catalog, replica

Guarding the replicas: bodies over `limits.max_body_bytes` get 413 before parsing; strict schemas
(schemas.py) and the configured limits give 422 with the offending field; error bodies never echo the
input back (it may be huge or not encodable). With SEQREC_API_KEY set in the ingress replicas' environment,
every route but /healthz needs `X-API-Key`. Requests to a replica that died are retried on another one
(reads are idempotent), which is what keeps the failed share low when a replica is killed.

Hot path: POST /recommend with a JSON body is answered by the `RecommendFastPath` middleware, which runs the
route's own parsing, schema, key check and `Ingress.recommend_result` without FastAPI's routing and
dependency machinery (`fast_recommend_path: false` turns it off); every other request goes through FastAPI.

Build with `build_app({...})` (serve_config.yaml's import_path is `seqrec.serve.app:build_app`).
"""
import asyncio
import hmac
import json
import logging
import os
from typing import Any, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

import seqrec
from seqrec.serve.config import API_KEY_ENV, ServeSettings, is_generative, resolve_source, settings_from_dict
from seqrec.serve.deployments import BM25Search, CatalogStore, Generator, Recommender
from seqrec.serve.schemas import (
    ErrorBody,
    ItemsRequest,
    ItemsResponse,
    RecommendRequest,
    RecommendResponse,
    SearchRequest,
    SearchResponse,
)

log = logging.getLogger("seqrec.serve")

MAX_ITEM_TEXT_CHARS = 20_000
MAX_ITEM_ID_CHARS = 200
RETRIES_ON_REPLICA_DEATH = 3


class BodyLimit:
    """ASGI middleware: 413 for bodies over app.state.max_body_bytes (declared or streamed), before parsing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", 64 * 1024) if "app" in scope else 64 * 1024
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_error(send, 413, f"request body over {limit} bytes")
            return await self.app(scope, receive, send)
        # no declared length (chunked): read up to the limit, then replay to the app
        try:
            body, _ = await _read_body(receive, limit)
        except _BodyTooLarge:
            return await _send_error(send, 413, f"request body over {limit} bytes")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive, limit: Optional[int] = None) -> tuple[bytes, bool]:
    """(body, complete) from the ASGI receive channel: every chunk up to the last one (complete) or up to a
    disconnect (not complete); raises _BodyTooLarge as soon as more than `limit` bytes have arrived."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if limit is not None and size > limit:
            raise _BodyTooLarge
        if not message.get("more_body", False):
            return b"".join(chunks), True


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


api = FastAPI(
    title="seqrec",
    version=seqrec.__version__ if hasattr(seqrec, "__version__") else "0",
    description="Sequential recommendations, item search and catalog updates served by Ray Serve.",
)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "status": status, **extra})


def _validation_response(errors) -> JSONResponse:
    """422 naming the offending fields (at most 10), for FastAPI's and pydantic's validation errors alike."""
    problems = []
    for err in list(errors)[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":  # FastAPI puts the character offset in loc
            loc = "body"
        problems.append({"field": loc, "message": str(err.get("msg", "invalid"))[:200], "type": err.get("type")})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:3])
    return _error(422, f"invalid request: {summary}", problems=problems)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_response(exc.errors())


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}")


def check_api_key(x_api_key: Optional[str]) -> None:
    expected = os.environ.get(API_KEY_ENV)
    if expected and not (x_api_key and hmac.compare_digest(x_api_key.encode(), expected.encode())):
        raise HTTPException(status_code=401, detail=f"missing or wrong X-API-Key (the server has {API_KEY_ENV} set)")


async def require_api_key(x_api_key: Optional[str] = Header(None)) -> None:  # async: no threadpool hop
    check_api_key(x_api_key)


class RecommendFastPath:
    """ASGI middleware: POST /recommend with a JSON body is answered without FastAPI's routing, dependency
    solving and request parsing, which cost ~0.25 ms of CPU per request (a tenth of what one request may cost
    at 800 req/s on two cores). It runs the route's own code: the same parsing (json.loads) and schema,
    `check_api_key`, `Ingress.recommend_result` and error bodies. The FastAPI route stays the documented one
    and serves everything else: other content types, and all requests when `fast_recommend_path` is off or no
    Ingress is attached (e.g. the app used outside Serve)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        ingress = None
        if scope["type"] == "http" and scope.get("path") == "/recommend" and scope.get("method") == "POST" and "app" in scope:
            ingress = getattr(scope["app"].state, "fast_ingress", None)
        if ingress is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not headers.get(b"content-type", b"").lower().startswith(b"application/json"):
            return await self.app(scope, receive, send)
        body, complete = await _read_body(receive)  # BodyLimit (outside) has enforced the size limit
        if not complete:
            return  # the client went away
        try:
            key = headers.get(b"x-api-key")
            check_api_key(key.decode("latin-1") if key is not None else None)
            try:  # parsed as the route parses it: json.loads (422 if not JSON, 400 if not text), then the schema
                data = json.loads(body) if body else None
            except json.JSONDecodeError as e:
                response = _validation_response([{"loc": ("body",), "type": "json_invalid",
                                                  "msg": f"JSON decode error: {e.msg} at position {e.pos}"}])
            except ValueError:  # UnicodeDecodeError
                raise HTTPException(status_code=400, detail="There was an error parsing the body") from None
            else:
                try:
                    req = RecommendRequest.model_validate(data)
                except ValidationError as e:
                    response = _validation_response(e.errors(include_url=False, include_input=False))
                else:
                    response = JSONResponse(await ingress.recommend_result(req))
        except HTTPException as e:
            response = _error(e.status_code, str(e.detail))
        except Exception as e:
            log.exception("unhandled error on /recommend")
            response = _error(500, f"internal error: {type(e).__name__}")
        await response(scope, receive, send)


api.add_middleware(RecommendFastPath)
api.add_middleware(BodyLimit)  # added last = outermost: the size limit applies to the fast path too


def _check_text(value: Optional[str], field: str, max_chars: int) -> Optional[str]:
    if value is None:
        return None
    if len(value) > max_chars:
        raise HTTPException(status_code=422, detail=f"{field} is {len(value)} characters; at most {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON \ud800-style escapes decode to lone surrogates
        raise HTTPException(status_code=422, detail=f"{field} is not valid Unicode text (lone surrogate)") from None
    return value


def _check_k(k: int, max_k: int) -> None:
    if not 1 <= k <= max_k:
        raise HTTPException(status_code=422, detail=f"k must be between 1 and {max_k}; got {k}")


_ERRORS = {400: "bad request", 401: "unauthorized", 413: "request too large", 422: "invalid request",
           500: "internal error", 503: "service unavailable"}
_DOCS = {s: {"model": ErrorBody, "description": d} for s, d in _ERRORS.items()}


@serve.deployment
@serve.ingress(api)
class Ingress:
    """The HTTP API. `recommender` is the model deployment's handle (Recommender or Generator), or None with
    `score_in_ingress`: then this replica ranks itself with the Recommender's code (model = this deployment's
    user_config), which saves a Serve hop per request."""

    def __init__(self, recommender, bm25, store, settings: dict[str, Any]) -> None:
        self.recommender, self.bm25, self.store = recommender, bm25, store
        self.settings: ServeSettings = settings_from_dict(settings)
        api.state.max_body_bytes = self.settings.limits.max_body_bytes
        api.state.fast_ingress = self if self.settings.fast_recommend_path else None  # one Ingress per replica
        self.local = Recommender.func_or_class(settings, store) if recommender is None else None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Only with score_in_ingress (the model is this deployment's user_config): load/swap in place."""
        if self.local is not None:
            await self.local.reconfigure(user_config)

    def check_health(self) -> None:
        if self.local is not None:
            self.local.check_health()

    async def _model(self, method: str, *args) -> dict[str, Any]:
        if self.local is None:
            return await self._call(self.recommender, method, *args)
        result = getattr(self.local, method)(*args)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, dict) and "error" in result:
            raise HTTPException(status_code=int(result["error"]["status"]), detail=result["error"]["message"])
        return result

    async def _call(self, handle, method: str, *args) -> dict[str, Any]:
        """Call a deployment; retry on another replica if the one serving it died; 503 if none answers."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        last: Optional[Exception] = None
        for attempt in range(RETRIES_ON_REPLICA_DEATH + 1):
            try:
                result = await getattr(handle, method).remote(*args)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                last = e
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            except Exception as e:  # e.g. back-pressure when every replica is at max_ongoing_requests
                if type(e).__name__ in ("BackPressureError", "DeploymentUnavailableError"):
                    raise HTTPException(status_code=503, detail=f"overloaded: {type(e).__name__}") from None
                raise
            if isinstance(result, dict) and "error" in result:
                err = result["error"]
                raise HTTPException(status_code=int(err["status"]), detail=err["message"])
            return result
        raise HTTPException(status_code=503, detail=f"no healthy replica answered ({type(last).__name__})")

    @api.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True, responses=_DOCS,
              dependencies=[Depends(require_api_key)])
    async def recommend(self, req: RecommendRequest) -> dict[str, Any]:
        # the answer is plain JSON types already: skip FastAPI's response_model re-validation (docs keep the schema)
        return JSONResponse(await self.recommend_result(req))

    async def recommend_result(self, req: RecommendRequest) -> dict[str, Any]:
        """/recommend after schema validation (the route and RecommendFastPath): limits, then the model."""
        lim = self.settings.limits
        if not req.history:
            raise HTTPException(status_code=422, detail="history is empty; send at least one item")
        if len(req.history) > lim.max_history:
            raise HTTPException(status_code=422, detail=f"history has {len(req.history)} items; at most {lim.max_history}")
        _check_k(req.k, lim.max_k)
        critique = _check_text(req.critique, "critique", lim.max_critique_chars)
        if critique is not None and not critique.strip():
            critique = None
        for item in req.history:
            if isinstance(item, str):
                _check_text(item, "history item", MAX_ITEM_ID_CHARS)
        payload = {"history": req.history, "k": req.k, "critique": critique, "exclude_history": req.exclude_history}
        return await self._model("recommend", payload)

    @api.post("/search", response_model=SearchResponse, responses=_DOCS, dependencies=[Depends(require_api_key)])
    async def search(self, req: SearchRequest) -> dict[str, Any]:
        lim = self.settings.limits
        _check_k(req.k, lim.max_k)
        query = _check_text(req.query, "query", lim.max_query_chars)
        if not query.strip():
            raise HTTPException(status_code=422, detail="query is empty")
        return await self._call(self.bm25, "search", query, req.k)

    @api.post("/items", response_model=ItemsResponse, responses=_DOCS, dependencies=[Depends(require_api_key)])
    async def items(self, req: ItemsRequest) -> dict[str, Any]:
        from seqrec.data.text import format_item_text

        lim = self.settings.limits
        if not 1 <= len(req.items) <= lim.max_items_per_update:
            raise HTTPException(status_code=422, detail=f"send 1..{lim.max_items_per_update} items; got {len(req.items)}")
        seen, rows = set(), []
        for it in req.items:
            item_id = _check_text(it.item_id, "item_id", MAX_ITEM_ID_CHARS).strip()
            if not item_id:
                raise HTTPException(status_code=422, detail="item_id is empty")
            if item_id in seen:
                raise HTTPException(status_code=422, detail=f"item_id {item_id!r} appears twice")
            seen.add(item_id)
            title = _check_text(it.title, "title", MAX_ITEM_TEXT_CHARS).strip()
            for field, value in (("text", it.text), ("brand", it.brand), ("price", it.price)):
                _check_text(value, field, MAX_ITEM_TEXT_CHARS)
            for c in it.categories or []:
                _check_text(c, "categories", MAX_ITEM_TEXT_CHARS)
            text = it.text if it.text and it.text.strip() else format_item_text(title, it.categories, it.brand, it.price)
            if not title and not text.strip():
                raise HTTPException(status_code=422, detail=f"item {item_id!r} has neither title nor text")
            rows.append({"item_id": item_id, "title": title, "text": text})
        info = await self._model("info")
        result = await self._call(self.store, "submit", rows, bool(info.get("new_items")))
        return {**result, "visible_within_s": 2 * self.settings.catalog_sync_s}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        try:
            rec, bm = await asyncio.wait_for(
                asyncio.gather(self._model("info"), self._call(self.bm25, "info")), timeout=10)
        except (asyncio.TimeoutError, HTTPException) as e:
            raise HTTPException(status_code=503, detail=f"not ready: {type(e).__name__}") from None
        if not (rec.get("ready") and bm.get("ready")):
            raise HTTPException(status_code=503, detail="not ready: model or index still loading")
        return {"status": "ok"}

    @api.get("/version", dependencies=[Depends(require_api_key)])
    async def version(self) -> dict[str, Any]:
        rec = await self._model("info")
        bm = await self._call(self.bm25, "info")
        return {"seqrec": getattr(seqrec, "__version__", "0"), "model": rec, "bm25": bm,
                "catalog_version": await self._call(self.store, "version")}


# ------------------------------------------------------------------------------------------- builder
def deployment_options(opts, *, autoscale: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus,
                              **({"resources": dict(opts.resources)} if opts.resources else {})},
        "max_ongoing_requests": opts.max_ongoing_requests,
        "health_check_period_s": opts.health_check_period_s,
        "health_check_timeout_s": opts.health_check_timeout_s,
    }
    if autoscale and opts.max_replicas > opts.min_replicas:
        out["autoscaling_config"] = {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                                     "target_ongoing_requests": opts.target_ongoing_requests}
        for key in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(opts, key) is not None:
                out["autoscaling_config"][key] = getattr(opts, key)
    else:
        out["num_replicas"] = opts.min_replicas
    return out


def build_app(args: Optional[dict[str, Any]] = None):
    """The seqrec application from a settings mapping (see config.ServeSettings), e.g.
    {"model": {"checkpoint": "runs/train/x/checkpoint_00000700"}}. Relative paths resolve against the
    builder's working directory (or SEQREC_ROOT when set, for `serve deploy` from elsewhere)."""
    args = dict(args or {})
    root = os.environ.get("SEQREC_ROOT")
    cwd = os.getcwd()
    try:
        if root:
            os.chdir(root)
        settings = settings_from_dict(args)
        source = resolve_source(settings.model)
    finally:
        os.chdir(cwd)
    shared = json.loads(json.dumps(args))
    shared.pop("model", None)  # the model travels in user_config so a swap does not restart replicas
    store = CatalogStore.options(user_config={"dataset": source.dataset}).bind()
    bm25 = BM25Search.options(user_config={"dataset": source.dataset}, **deployment_options(settings.bm25)).bind(shared, store)
    model_config = {"checkpoint": source.checkpoint, "dataset": source.dataset}
    if is_generative(source.checkpoint):  # CALRec: samples item texts, BM25Search ranks them (QRR)
        model = Generator.options(user_config=model_config, **deployment_options(settings.generator)).bind(
            shared, store, bm25)
    elif settings.score_in_ingress:
        return Ingress.options(user_config=model_config, **deployment_options(settings.ingress)).bind(
            None, bm25, store, shared)
    else:
        model = Recommender.options(user_config=model_config, **deployment_options(settings.recommender)).bind(
            shared, store)
    return Ingress.options(**deployment_options(settings.ingress)).bind(model, bm25, store, shared)

