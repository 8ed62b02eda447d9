"""``imgclf serve``: an HTTP server with dynamic batching, OOD rejection, drift monitoring and Prometheus metrics.

Endpoints (``{m}`` = ``models/NAME`` or ``models/NAME/versions/V``; without it, the first model):

- ``POST /predict``, ``POST /{m}/predict``: one image as the body (``image/*`` or
  ``application/octet-stream``), several as ``multipart/form-data`` files, or JSON
  ``{"images": [base64, ...]}`` -> top-k labels with calibrated probabilities, ``unknown`` and the
  OOD score per image (``?top_k=3``);
- KServe v2 / Open Inference Protocol: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/NAME[/versions/V]`` (metadata), ``.../ready``, ``.../config``, ``POST .../infer``
  (input ``input``: UINT8 pixels ``[N, H, W, 3]`` at the model's size, or ``image``: BYTES encoded
  images; outputs ``logits``, ``probs``, ``features``, ``ood_score``, ``unknown``; Triton's binary
  data and classification extensions), so ``tritonclient.http`` works unchanged;
- ``GET /drift``, ``GET /{m}/drift``: drift distances of the sliding window; ``GET /metrics``:
  Prometheus; ``GET /models``: what is served.

Bad input (not an image, truncated, too many pixels, too large a body, wrong content type, bad
JSON or tensors) gets a 4xx JSON ``{"error": ...}``; a full queue 503 with Retry-After, answered from
the headers alone (the body is neither waited for nor parsed) and the refused connection left unread for
``--refuse-pause-ms``, so clients that retry at once cannot starve the accepted requests of CPU; a
request over its time 504. SIGINT/SIGTERM stop intake (readiness turns 503) and finish the queued work.

Where the time goes (28 px PNGs, 2 cores): the runtime call, then decoding and resizing (done in the
decode pool in rounds, while requests wait for their batch: ``batcher``), then aiohttp's own work per
request; the handler itself is kept to a few dict lookups and one JSON encoding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from ..data.images import BadImage, decode_image
from ..errors import ImgclfError
from ..eval.drift import THRESHOLDS
from .batcher import Draining, QueueFull
from .kserve import HEADER, ProtocolError, encode_response, parse_request
from .serving import ServedModel, ServeOptions

log = logging.getLogger("imgclf")
OUTPUT_TYPES = {"logits": "FP32", "probs": "FP32", "features": "FP32", "ood_score": "FP32", "unknown": "BOOL"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


_DRAINING = b'{"error": "server is shutting down"}'
_FILENAME = re.compile(r'filename="([^"]*)"')
_MAX_HELD = 256  # refusals held back at once (each keeps its connection open); beyond, answered at once
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("imgclf_requests", "HTTP requests", ["model", "endpoint", "code"], registry=r)
        self.latency = Histogram("imgclf_request_seconds", "request latency", ["model", "endpoint"], registry=r,
                                 buckets=_SECONDS + (5, 10, 30))  # fmt: skip
        self.batch = Histogram("imgclf_batch_size", "images per runtime call", ["model"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        self.infer = Histogram("imgclf_inference_seconds", "runtime call time", ["model"], registry=r,
                               buckets=_SECONDS)  # fmt: skip
        self.queue = Gauge("imgclf_queue_images", "images waiting for a batch", ["model"], registry=r)
        self.images = Counter("imgclf_images", "images classified", ["model"], registry=r)
        self.unknown = Counter("imgclf_unknown", "images answered unknown (OOD)", ["model"], registry=r)
        self.unknown_rate = Gauge("imgclf_unknown_rate", "unknown share in the drift window", ["model"], registry=r)
        self.rejects = Counter("imgclf_rejected", "requests refused", ["model", "reason"], registry=r)
        self.drift = Gauge("imgclf_drift", "drift distance of the window", ["model", "statistic"], registry=r)
        self.drifted = Gauge("imgclf_drifted", "1 when a drift statistic is past its threshold", ["model"], registry=r)
        self.model_events = Counter("imgclf_model_events", "repository loads, unloads and failed loads",
                                    ["name", "event"], registry=r)  # fmt: skip
        self.captured = Counter("imgclf_captured", "images handed to the capture folder", ["model", "reason"],
                                registry=r)  # fmt: skip
        self.capture_dropped = Gauge("imgclf_capture_dropped", "captures dropped (writer behind, or too large)",
                                     registry=r)  # fmt: skip
        self.on_drift = Counter("imgclf_on_drift_runs", "--on-drift runs by outcome", ["model", "result"], registry=r)
        self._children: dict[tuple, Any] = {}

    def forget(self, key: str) -> None:
        """Drop the gauges of an unloaded model version (its counters stay: Prometheus counters never go back)."""
        for g in (self.queue, self.unknown_rate, self.drifted):
            _remove(g, key)
        for stat in THRESHOLDS:  # the drift statistics
            _remove(self.drift, key, stat)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (``labels`` validates and locks on every call)."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c


class Server:
    """The application state: models, options, metrics, the decode pool."""

    def __init__(self, models: dict[str, dict[str, ServedModel]], opts: ServeOptions):
        if not models and not opts.repository:
            raise ImgclfError("serve needs at least one run (or a --repository)")
        disable_created_metrics()  # no *_created series: they double the scrape for nothing here
        self.models, self.opts, self.metrics = models, opts, Metrics()
        self.draining = False
        self.inflight = 0  # requests being read, decoded or waiting for their batch
        self._held = 0  # refusals waiting out --refuse-pause-ms before their answer
        self.decode_pool = ThreadPoolExecutor(opts.decode_threads, thread_name_prefix="imgclf-decode")
        self.capture = self.hook = self.repository = None
        if opts.capture_dir:
            from .capture import Capture

            self.capture = Capture(opts.capture_dir, opts.capture_rate, opts.capture_below, opts.capture_max_mb)
        if opts.on_drift:
            from .hooks import DriftHook

            on_result = lambda key, result: self.metrics.on_drift.labels(key, result).inc()  # noqa: E731
            self.hook = DriftHook(opts.on_drift, opts.on_drift_cooldown_s, opts.on_drift_timeout_s,
                                  opts.capture_dir, on_result)  # fmt: skip
        if opts.repository:
            from .repository import Repository

            self.repository = Repository(self, opts.repository, opts.keep_versions)
        for m in self.all_models():
            self._attach(m)

    def _attach(self, m: ServedModel) -> None:
        """Wire a loaded model to the server: metrics, the decode pool, the --on-drift hook."""
        b, opts = m.batcher, self.opts
        b.on_batch, b.pool, b.prepare_threads = self._batch_observer(m.key), self.decode_pool, opts.decode_threads
        b.prepare = functools.partial(self._decode, m)  # uploads are decoded in rounds, in the pool
        if self.hook is not None:
            hook = self.hook
            m.monitor.listener = lambda rep: hook.update(m.key, rep.get("status", ""), lambda: self._drift_doc(m, rep))

    def _drift_doc(self, m: ServedModel, rep: dict[str, Any]) -> dict[str, Any]:
        return {"event": "drift", "model": m.name, "version": m.version, "run": str(m.run_dir.resolve()),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "capture_dir": self.opts.capture_dir,
                "report": rep}  # fmt: skip

    @property
    def default(self) -> str | None:
        return next(iter(self.models), None)

    def all_models(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def _batch_observer(self, key: str):
        batch, infer = self.metrics.batch.labels(key), self.metrics.infer.labels(key)

        def observe(n: int, seconds: float) -> None:
            batch.observe(n)
            infer.observe(seconds)

        return observe

    def model(self, name: str | None, version: str | None = None) -> ServedModel:
        name = name or self.default
        if name is None:
            raise ApiError(503, "no model is loaded", {"Retry-After": "5"})
        if name not in self.models:
            raise ApiError(404, f"no model named {name!r} (served: {', '.join(self.models)})")
        versions = self.models[name]
        if version is None:
            return versions[_versions(versions)[-1]]
        if version not in versions:
            raise ApiError(404, f"model {name!r} has no version {version!r} (versions: {', '.join(versions)})")
        return versions[version]

    async def load(self, name: str, version: str, run: Path, origin: str = "spec") -> ServedModel:
        """Load and warm up a run off the event loop (the served models keep answering), then route to it: a
        new highest version takes the requests that name no version at once. Raises what loading raises."""
        from .serving import load_one

        m = await asyncio.get_running_loop().run_in_executor(None, load_one, name, version, run, self.opts, origin)
        self._attach(m)
        m.batcher.start()
        self.models.setdefault(name, {})[version] = m
        self.metrics.model_events.labels(name, "load").inc()
        return m

    async def retire(self, m: ServedModel) -> None:
        """Take ``m`` out of routing, let every request that had chosen it finish (up to ``--drain-s``), then stop
        its batcher and drop its gauges. Requests are never failed for this (a late one naming it gets 404)."""
        versions = self.models.get(m.name, {})
        if versions.get(m.version) is m:
            del versions[m.version]
        if not versions:
            self.models.pop(m.name, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.drain_s
        while m.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        done = await m.batcher.drain(max(0.0, deadline - loop.time()))
        if m.active > 0 or not done:
            log.warning("model %s: requests still running after %.0f s of draining", m.key, self.opts.drain_s)
        self.metrics.forget(m.key)
        self.metrics.model_events.labels(m.name, "unload").inc()
        log.info("model %s unloaded", m.key)

    # ------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=int(self.opts.max_body_mb * 2**20), middlewares=[self._errors])
        m, v = "/models/{name}", "/models/{name}/versions/{version}"
        k, kv = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
        app.add_routes([
            web.get("/", self.index), web.get("/health", self.health), web.get("/models", self.list_models),
            web.get("/metrics", self.prometheus), web.get("/drift", self.drift),
            web.post("/predict", self.predict), web.post(m + "/predict", self.predict),
            web.post(v + "/predict", self.predict),
            web.get(m + "/drift", self.drift), web.get(v + "/drift", self.drift),
            web.get("/v2", self.v2_server), web.get("/v2/health/live", self.v2_live),
            web.get("/v2/health/ready", self.v2_ready),
            web.get(k, self.v2_metadata), web.get(kv, self.v2_metadata),
            web.get(k + "/ready", self.v2_model_ready), web.get(kv + "/ready", self.v2_model_ready),
            web.get(k + "/config", self.v2_config), web.get(kv + "/config", self.v2_config),
            web.post(k + "/infer", self.v2_infer), web.post(kv + "/infer", self.v2_infer),
            web.post("/v2/repository/index", self.v2_repository_index),
            web.post("/v2/repository/models/{name}/load", self.v2_repository_load),
            web.post("/v2/repository/models/{name}/unload", self.v2_repository_unload),
        ])  # fmt: skip
        app.on_startup.append(self._start)
        return app

    async def _start(self, app: web.Application) -> None:
        for m in self.all_models():
            m.batcher.start()

    async def drain(self) -> None:
        """Stop taking work; let queued requests finish (up to ``drain_s``)."""
        self.draining = True
        done = await asyncio.gather(*(m.batcher.drain(self.opts.drain_s) for m in self.all_models()))
        if not all(done):
            log.warning("shutdown: queued requests did not finish within %.0f s", self.opts.drain_s)

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = web.json_response({"error": e.message}, status=e.status, headers=e.headers)
        except web.HTTPException as e:  # aiohttp's own: 404/405 routes, 413 body over client_max_size
            msg = e.text or e.reason
            if e.status == 413:
                msg = f"request body is over the limit of {self.opts.max_body_mb:g} MB"
            resp = web.json_response({"error": msg}, status=e.status)
        except Exception:  # noqa: BLE001 - a bug of ours: say so without the traceback, log it
            log.exception("internal error on %s %s", request.method, request.path)
            resp = web.json_response({"error": "internal server error (logged)"}, status=500)
        finally:
            if (served := request.get("served")) is not None:
                served.active -= 1  # a retired version waits for this before it stops
        if endpoint not in ("/metrics",):
            name = request.get("model", "-")
            mt = self.metrics
            mt.child(mt.requests, name, endpoint, str(resp.status)).inc()
            if resp.status < 400:
                mt.child(mt.latency, name, endpoint).observe(time.perf_counter() - t0)
            elif resp.status in (400, 408, 413, 415):
                mt.child(mt.rejects, name, "bad_request").inc()
        return resp

    # ------------------------------------------------------------ reading requests

    def _model_of(self, request: web.Request) -> ServedModel:
        q = request.rel_url.query
        m = self.model(request.match_info.get("name") or q.get("model"),
                       request.match_info.get("version") or q.get("version"))  # fmt: skip
        if request.get("served") is None:
            request["model"], request["served"] = m.key, m
            m.active += 1
        return m

    def _check_length(self, request: web.Request) -> None:
        """413 from the Content-Length header alone, before reading anything."""
        if request.content_length is not None and request.content_length > request.app._client_max_size:
            raise ApiError(413, f"request body of {request.content_length} bytes is over the limit of "
                                f"{self.opts.max_body_mb:g} MB")  # fmt: skip

    async def _body(self, request: web.Request) -> bytes:
        self._check_length(request)
        try:
            if request.content.is_eof():  # all in already (a small upload): no timer to set
                return await request.read()
            async with asyncio.timeout(self.opts.read_timeout_s):
                return await request.read()
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.opts.read_timeout_s:g} s") from None
        except web.HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - the client went away or sent a broken chunked body
            raise ApiError(400, f"request body could not be read ({type(e).__name__})") from None

    async def _uploads(self, request: web.Request) -> list[tuple[str, bytes]]:
        """(source name, encoded bytes) of every image in a /predict request."""
        # not request.content_type: aiohttp parses it with the e-mail package, a quarter of the loop's time
        ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                async with asyncio.timeout(self.opts.read_timeout_s):
                    return await self._multipart(request)
            except TimeoutError:
                raise ApiError(408, f"request body not received within {self.opts.read_timeout_s:g} s") from None
        if ctype == "application/json":
            body = await self._body(request)
            try:
                doc = json.loads(body)
                items = doc["images"]
                assert isinstance(items, list) and all(isinstance(s, str) for s in items)
                return [(f"images[{i}]", base64.b64decode(s, validate=True)) for i, s in enumerate(items)]
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ApiError(400, f"malformed JSON body ({e})") from None
            except (KeyError, TypeError, AssertionError):
                raise ApiError(400, 'JSON body must be {"images": [base64 strings]}') from None
            except binascii.Error:
                raise ApiError(400, "images[] must be base64 strings") from None
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [("body", await self._body(request))]
        raise ApiError(415, f"content type {ctype or 'none'!r} is not accepted: send image/*, "
                            "application/octet-stream, multipart/form-data or application/json")  # fmt: skip

    async def _multipart(self, request: web.Request) -> list[tuple[str, bytes]]:
        from aiohttp import BodyPartReader

        self._check_length(request)
        files: list[tuple[str, bytes]] = []
        total = 0
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "nested multipart bodies are not accepted")
                data = await part.read()
                total += len(data)
                if total > request.app._client_max_size:
                    raise web.HTTPRequestEntityTooLarge(max_size=request.app._client_max_size, actual_size=total)
                # a file part has a filename in its Content-Disposition; plain form fields are ignored. (Not
                # part.filename: aiohttp parses the header with a slow general parser, ~10 % of the loop's time)
                disposition = part.headers.get("Content-Disposition", "")
                if "filename" in disposition:
                    name = f"part[{len(files)}]"
                    if self.capture is not None and (fn := _FILENAME.search(disposition)):
                        name = fn[1]  # the client's file name, kept with a captured image
                    files.append((name, bytes(data)))
                if len(files) > self.opts.max_images:
                    raise ApiError(413, f"more than {self.opts.max_images} images in one request")
        except (ApiError, web.HTTPException):
            raise
        except Exception as e:  # noqa: BLE001 - aiohttp raises several types for broken multipart bodies
            raise ApiError(400, f"malformed multipart body ({type(e).__name__}: {e})") from None
        if not files:
            raise ApiError(400, "multipart body has no file parts (send images as files)")
        return files

    def _count(self, uploads: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """``uploads`` if their number is within the limits (400 none, 413 over ``--max-images``)."""
        if not uploads:
            raise ApiError(400, "no images in the request")
        if len(uploads) > self.opts.max_images:
            raise ApiError(413, f"{len(uploads)} images in one request; the limit is {self.opts.max_images}")
        return uploads

    def _decode(self, m: ServedModel, uploads: list[tuple[str, bytes]]) -> np.ndarray:
        """(In the decode pool, as the batcher's ``prepare``.) (N, H, W, 3) uint8 pixels of a request's
        encoded images, decoded and resized one at a time: only one full-size image is ever held per thread.
        ApiError 400 for an empty or bad image, 413 for one over the pixel limits."""
        to_px, rows = m.to_pixels, []
        for source, data in uploads:
            if not data:
                raise ApiError(400, f"{source}: empty image")
            try:
                img = decode_image(data, source, m.decode)
                rows.append(to_px(img))
            except BadImage as e:
                raise ApiError(413 if e.too_large else 400, str(e)) from None
            except MemoryError:
                raise ApiError(413, f"{source}: too large to preprocess") from None
            del img
        return rows[0][None] if len(rows) == 1 else np.stack(rows)  # (one image: a view, the batch copies it)

    def _reject(self, m: ServedModel, reason: str) -> ApiError:
        """Count a refusal and make its answer: 503 + Retry-After (draining, queue_full) or 504 (timeout)."""
        self.metrics.child(self.metrics.rejects, m.key, reason).inc()
        if reason == "timeout":
            return ApiError(504, f"no answer within {self.opts.timeout_s:g} s (server overloaded)")
        if reason == "draining":
            return ApiError(503, "server is shutting down", {"Retry-After": "5"})
        return ApiError(503, f"model {m.key} is busy", {"Retry-After": str(m.batcher.retry_after())})

    async def _refusal(self, request: web.Request, m: ServedModel) -> web.Response | None:
        """503 + Retry-After when the model cannot take the request now (draining, its queue or the in-flight
        limit full), made before the body is read or anything parsed; None to go on.

        A refused client is not heard again for ``refuse_pause_ms``, so one that retries at once, ignoring
        Retry-After, cannot take the CPU the accepted requests need: a keep-alive connection whose request
        has arrived whole is answered at once and not read for that long; any other (a one-shot connection,
        or one whose body is still on its way: the server reads and drops the rest after answering, then
        reads the next request, so pausing it would pause nothing) gets its answer that much later (at most
        ``_MAX_HELD`` at a time; HTTP/1.1 clients send their next request only after the answer)."""
        if self.draining:
            reason, retry = "draining", 5
        elif m.batcher.queued_images >= self.opts.max_queue or self.inflight >= self.opts.max_inflight:
            reason, retry = "queue_full", m.batcher.retry_after()
        else:
            return None
        self.metrics.child(self.metrics.rejects, m.key, reason).inc()
        body = _DRAINING if reason == "draining" else m.busy_body
        resp = web.Response(body=body, status=503, content_type="application/json", headers={"Retry-After": str(retry)})
        pause, transport = self.opts.refuse_pause_ms / 1000, request.transport
        if pause <= 0 or transport is None:
            return resp
        if request.keep_alive and request.content.is_eof():  # (else aiohttp reads the rest of the body)
            transport.pause_reading()
            asyncio.get_running_loop().call_later(pause, _resume_reading, transport)
        elif self._held < _MAX_HELD:
            self._held += 1
            try:
                await asyncio.sleep(pause)
            finally:
                self._held -= 1
        return resp

    async def _run(self, m: ServedModel, items: np.ndarray | list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
        """Every output of a request's images: (N, H, W, C) uint8 pixels, or encoded uploads (decoded with
        their batch). Raises ApiError 503 (queue full, draining), 504 (timeout), or the uploads' 400/413."""
        try:
            async with asyncio.timeout(self.opts.timeout_s):  # cheaper than wait_for: no extra task per request
                out = await m.batcher.submit(items, len(items))
        except QueueFull:
            raise self._reject(m, "queue_full") from None
        except Draining:
            raise self._reject(m, "draining") from None
        except TimeoutError:
            raise self._reject(m, "timeout") from None
        mt = self.metrics
        mt.child(mt.images, m.key).inc(len(items))
        if "unknown" in out:
            mt.child(mt.unknown, m.key).inc(int(out["unknown"].sum()))
        return out

    # ------------------------------------------------------------ native endpoints

    async def predict(self, request: web.Request) -> web.Response:
        m = self._model_of(request)
        if (busy := await self._refusal(request, m)) is not None:
            return busy
        top_k = _int_param(request, "top_k", self.opts.top_k, 1, m.art.num_classes)
        self.inflight += 1
        try:
            uploads = self._count(await self._uploads(request))
            out = await self._run(m, uploads)
        finally:
            self.inflight -= 1
        if self.capture is not None:
            self._capture(request, m, out, uploads)
        return web.json_response(
            {"model": m.name, "version": m.version, "predictions": self._predictions(m, out, top_k)}
        )

    def _capture(self, request: web.Request, m: ServedModel, out: dict[str, np.ndarray],
                 items: np.ndarray | list[tuple[str, bytes]]) -> None:  # fmt: skip
        """Hand the images --capture keeps to its writer (never waits: a full queue drops and counts)."""
        from .capture import Captured

        cap, probs = self.capture, out["probs"]
        chosen = cap.choose(probs, out.get("unknown"))
        if not chosen:
            return
        rid, now, names, n = request.headers.get("X-Request-Id", ""), time.time(), m.art.class_names, len(items)
        sets = m.label_sets(probs[[i for i, _ in chosen]]) if m.trust.multi_label else None
        for j, (i, reason) in enumerate(chosen):
            pixels = items[i] if isinstance(items, np.ndarray) else None
            src, data = (f"input[{i}]", None) if pixels is not None else items[i]
            unknown = bool(out["unknown"][i]) if "unknown" in out else None
            if sets is not None:
                predicted = "|".join(names[c] for c in sets[j])
            else:
                predicted = "unknown" if unknown else names[int(probs[i].argmax())]
            item = Captured(data, pixels, predicted, float(probs[i].max()), unknown,
                            float(out["ood_score"][i]) if "ood_score" in out else None, m.name, m.version, reason,
                            rid if rid and n == 1 else ":".join(x for x in (rid, src) if x), now)  # fmt: skip
            if cap.offer(item):
                self.metrics.child(self.metrics.captured, m.key, reason).inc()
        self.metrics.capture_dropped.set(cap.dropped)

    @staticmethod
    def _predictions(m: ServedModel, out: dict[str, np.ndarray], top_k: int) -> list[dict[str, Any]]:
        """/predict's answer per image: top-k labels with calibrated probabilities (6 decimals), the decided label
        (or a multi-label run's label set), and ``unknown`` with the OOD score when the run has an OOD rule."""
        names, probs = m.art.class_names, out["probs"]
        k = min(top_k, len(names))
        order = np.argsort(-probs, axis=1)[:, :k]
        sets = m.label_sets(probs) if m.trust.multi_label else None
        rows = probs.tolist()  # Python floats at once: indexing numpy scalars one by one costs more than this
        unknown = out["unknown"].tolist() if "unknown" in out else None
        scores = out["ood_score"].tolist() if "unknown" in out else None
        preds = []
        for i, row in enumerate(order.tolist()):
            top = [{"label": names[c], "prob": round(rows[i][c], 6)} for c in row]
            p: dict[str, Any] = {"top": top} if sets is not None else {"label": top[0]["label"], "top": top}
            if sets is not None:  # multi-label: the decided label set (possibly empty), most probable first
                p["labels"] = [{"label": names[c], "prob": round(rows[i][c], 6)} for c in sets[i]]
            if unknown is not None:
                p.update(unknown=bool(unknown[i]), ood_score=round(scores[i], 6))
                if p["unknown"]:
                    p.update(labels=[]) if sets is not None else p.update(label="unknown")
            preds.append(p)
        return preds

    async def index(self, request: web.Request) -> web.Response:
        routes = sorted({r.resource.canonical for r in request.app.router.routes() if r.resource})
        return web.json_response({"imgclf": "serve", "models": [m.key for m in self.all_models()], "endpoints": routes})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "draining" if self.draining else "ok"}, status=503 if self.draining else 200
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [m.describe() for m in self.all_models()]})

    async def drift(self, request: web.Request) -> web.Response:
        if "name" in request.match_info:
            ms = [self._model_of(request)]
        else:
            ms = self.all_models()
        reps = {m.key: await asyncio.get_running_loop().run_in_executor(None, m.monitor.check) for m in ms}
        return web.json_response({"models": reps})

    async def prometheus(self, request: web.Request) -> web.Response:
        for m in self.all_models():
            rep = m.monitor.last
            self.metrics.queue.labels(m.key).set(m.batcher.queued_images)
            self.metrics.unknown_rate.labels(m.key).set(rep.get("unknown_rate", 0.0))
            for stat in THRESHOLDS:  # the drift statistics
                if stat in rep:
                    self.metrics.drift.labels(m.key, stat).set(rep[stat])
            self.metrics.drifted.labels(m.key).set(1.0 if rep.get("status") == "drift" else 0.0)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------ KServe v2

    async def v2_server(self, request: web.Request) -> web.Response:
        from ..artifact import package_versions

        return web.json_response({"name": "imgclf", "version": package_versions().get("imgclf", ""),
                                  "extensions": ["binary_tensor_data", "classification"]})  # fmt: skip

    async def v2_live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def v2_ready(self, request: web.Request) -> web.Response:
        ready = not self.draining and all(m.batcher.healthy() for m in self.all_models())
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def v2_model_ready(self, request: web.Request) -> web.Response:
        ready = not self.draining and self._model_of(request).batcher.healthy()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def v2_metadata(self, request: web.Request) -> web.Response:
        m = self._model_of(request)
        outs = [{"name": n, "datatype": t, "shape": d} for n, t, d in self._outputs(m)]
        return web.json_response({
            "name": m.name, "versions": _versions(self.models[m.name]), "platform": f"imgclf_{m.predictor.name}",
            "inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, *m.input_hwc]},
                       {"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": outs,
            "parameters": {"labels": m.art.class_names, "preprocessing": m.art.preprocessing.to_json()},
        })  # fmt: skip

    def _outputs(self, m: ServedModel) -> list[tuple[str, str, list[int]]]:
        """(name, datatype, shape with -1 batch) of the outputs this model gives."""
        k = m.art.num_classes
        shapes = {"logits": [-1, k], "probs": [-1, k], "features": [-1, m.feat_dim], "ood_score": [-1], "unknown": [-1]}
        judged = bool(m.trust.thresholds)  # the OOD outputs exist only when the run has a threshold
        return [(n, t, shapes[n]) for n, t in OUTPUT_TYPES.items() if judged or n not in ("ood_score", "unknown")]

    async def v2_config(self, request: web.Request) -> web.Response:
        m = self._model_of(request)
        return web.json_response({
            "name": m.name, "platform": f"imgclf_{m.predictor.name}", "max_batch_size": self.opts.max_batch,
            "input": [{"name": "input", "data_type": "TYPE_UINT8", "dims": list(m.input_hwc)},
                      {"name": "image", "data_type": "TYPE_STRING", "dims": [1]}],
            "output": [{"name": n, "data_type": f"TYPE_{t}", "dims": d[1:] or [1]} for n, t, d in self._outputs(m)],
            "dynamic_batching": {"max_queue_delay_microseconds": int(1000 * self.opts.max_delay_ms)},
        })  # fmt: skip

    def _repository(self):
        if self.repository is None:
            raise ApiError(400, "this server has no model repository (start it with --repository REPO)")
        return self.repository

    async def v2_repository_index(self, request: web.Request) -> web.Response:
        """KServe v2 repository extension: every version found or served, READY or UNAVAILABLE (with why)."""
        repo = self._repository()
        body = await self._body(request)
        try:
            ready_only = bool(json.loads(body).get("ready", False)) if body.strip() else False
        except (ValueError, AttributeError):
            raise ApiError(400, 'repository index: body must be empty or a JSON object {"ready": bool}') from None
        rows = await asyncio.get_running_loop().run_in_executor(None, repo.index)
        return web.json_response([r for r in rows if r["state"] == "READY" or not ready_only])

    async def v2_repository_load(self, request: web.Request) -> web.Response:
        """Load the highest version(s) of ``name`` from the repository now (the swap of the file watch)."""
        repo, name = self._repository(), request.match_info["name"]
        if self.draining:
            raise ApiError(503, "server is shutting down", {"Retry-After": "5"})
        try:
            changes = await repo.sync(only=name)
        except ImgclfError as e:
            raise ApiError(400, str(e)) from None
        if name not in self.models:
            why = [r["reason"] for r in repo.index() if r["name"] == name and r["reason"]]
            raise ApiError(400, f"model {name!r}: no version could be loaded from {repo.root}"
                                + (f" ({why[-1]})" if why else ""))  # fmt: skip
        return web.json_response({"changes": changes, "versions": _versions(self.models[name])})

    async def v2_repository_unload(self, request: web.Request) -> web.Response:
        """Drain and unload every version of ``name``; the watcher leaves it alone until it is loaded again."""
        repo, name = self._repository(), request.match_info["name"]
        try:
            changes = await repo.unload(name)
        except ImgclfError as e:
            raise ApiError(400, str(e)) from None
        return web.json_response({"changes": changes})

    async def v2_infer(self, request: web.Request) -> web.Response:
        m = self._model_of(request)
        if (busy := await self._refusal(request, m)) is not None:
            return busy
        self.inflight += 1
        try:
            body = await self._body(request)
            loop = asyncio.get_running_loop()
            head = request.headers.get(HEADER)
            try:  # off the event loop: a large body of many small elements takes a while to split
                doc, tensors = await loop.run_in_executor(self.decode_pool, parse_request, body, head,
                                                          self.opts.max_images)  # fmt: skip
            except ProtocolError as e:
                raise ApiError(413 if e.too_large else 400, str(e)) from None
            items = self._v2_items(m, tensors)
            out = await self._run(m, items)
        finally:
            self.inflight -= 1
        if self.capture is not None:
            self._capture(request, m, out, items)
        outputs = self._v2_outputs(m, doc, out, len(items))
        meta = {"model_name": m.name, "model_version": m.version, **({"id": doc["id"]} if "id" in doc else {})}
        payload, head_len = encode_response(meta, outputs)
        if head_len is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream", headers={HEADER: str(head_len)})

    def _v2_items(self, m: ServedModel, tensors: dict[str, Any]) -> np.ndarray | list[tuple[str, bytes]]:
        """The request's images: UINT8 pixels (N, H, W, C) checked against the model's size, or BYTES uploads."""
        if len(tensors) != 1:
            raise ApiError(400, f"send exactly one input ('input' UINT8 pixels or 'image' BYTES), got {len(tensors)}")
        name, value = next(iter(tensors.items()))
        if isinstance(value, list):  # BYTES: encoded images
            return self._count([(f"{name}[{i}]", b) for i, b in enumerate(value)])
        want = (-1, *m.input_hwc)
        if value.dtype != np.uint8 or value.ndim != 4 or tuple(value.shape[1:]) != m.input_hwc:
            raise ApiError(400, f"input '{name}': UINT8 pixels of shape {list(want)} expected, got "
                                f"{value.dtype} {list(value.shape)}")  # fmt: skip
        if len(value) == 0:  # (more than --max-images was refused while parsing)
            raise ApiError(400, f"input '{name}': no images")
        return value

    def _v2_outputs(self, m: ServedModel, doc: dict[str, Any], out: dict[str, np.ndarray], n: int) -> list[tuple]:
        params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
        all_binary = bool(params.get("binary_data_output", False))
        wanted = doc.get("outputs")
        if wanted is None:
            wanted = [{"name": k} for k in OUTPUT_TYPES if k in out]
        if not isinstance(wanted, list) or not all(
            isinstance(w, dict) and isinstance(w.get("name"), str) for w in wanted
        ):
            raise ApiError(400, "'outputs' must be a list of {\"name\": ...} objects")
        result = []
        for w in wanted:
            name, p = w["name"], w.get("parameters") if isinstance(w.get("parameters"), dict) else {}
            binary = bool(p.get("binary_data", all_binary))
            if name not in OUTPUT_TYPES or name not in out:
                have = [k for k in OUTPUT_TYPES if k in out]
                raise ApiError(400, f"unknown output {name!r} (outputs: {', '.join(have)})")
            value = out[name]
            cls = p.get("classification")
            if cls and name not in ("logits", "probs"):
                raise ApiError(400, f"output {name!r}: classification applies to logits or probs only")
            if cls:  # Triton's classification extension: top-k "score:index:label" strings
                if not isinstance(cls, int) or cls < 1:
                    raise ApiError(400, f"output {name!r}: classification must be a positive integer")
                k = min(cls, value.shape[1])
                if m.trust.multi_label:  # each image's decided labels (most probable first, at most k), b"" padding
                    rows = [sets[:k] for sets in m.label_sets(out["probs"])]
                else:
                    rows = [list(r) for r in np.argsort(-value, axis=1)[:, :k]]
                names = m.art.class_names
                strs = [f"{value[i, c]:f}:{c}:{names[c]}".encode() if j < len(rows[i]) else b""
                        for i in range(n) for j, c in enumerate([*rows[i], *[0] * (k - len(rows[i]))])]  # fmt: skip
                result.append((name, "BYTES", strs, [n, k], binary))
            else:
                result.append((name, OUTPUT_TYPES[name], value, list(value.shape), binary))
        return result


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never set
        pass


def _resume_reading(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.resume_reading()


def _versions(versions: dict[str, Any]) -> list[str]:
    return sorted(versions, key=lambda v: (len(v), v))  # numeric order: "2" before "10"


def _int_param(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.rel_url.query.get(key)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {key} must be an integer (got {raw!r})") from None
    if v < lo:
        raise ApiError(400, f"query parameter {key} must be >= {lo} (got {v})")
    return min(v, hi)


async def _serve_async(server: Server, ready_file: str | None = None) -> None:
    opts = server.opts
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None, shutdown_timeout=opts.drain_s)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else opts.port
    log.info("serving %s on http://%s:%d (max batch %d, max delay %g ms, queue %d)",
             ", ".join(m.key for m in server.all_models()), opts.host, port, opts.max_batch, opts.max_delay_ms,
             opts.max_queue)  # fmt: skip
    if ready_file:
        from ..io import write_json

        write_json(ready_file, {"host": opts.host, "port": port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if server.repository is not None:
        watcher = loop.create_task(server.repository.watch(opts.poll_s))
        if hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, server.repository.wake.set)
    await stop.wait()
    log.info("shutting down: finishing queued requests (up to %.0f s)", opts.drain_s)
    if watcher is not None:
        watcher.cancel()
    await server.drain()
    await runner.cleanup()  # waits for the handlers still sending answers
    server.decode_pool.shutdown(wait=False)
    if server.capture is not None:
        server.capture.close()
    log.info("stopped")


def serve(specs: list[str], opts: ServeOptions | None = None, ready_file: str | None = None) -> None:
    """Load every run in ``specs`` and serve until SIGINT/SIGTERM (see the module docstring)."""
    from .serving import load_models

    opts = opts or ServeOptions()
    server = Server(load_models(specs, opts), opts)
    if server.repository is not None:
        server.repository.load_initial()
    if not any(m.predictor.name.startswith("torch") for m in server.all_models()):
        # PyTorch only scores OOD and drift on small arrays here; its OpenMP pool would spin on both cores
        # after each of them and take the CPU the compiled runtime and the HTTP loop need
        torch.set_num_threads(1)
    try:
        import uvloop  # a faster event loop where installed (Linux, macOS)

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_async(server, ready_file))
