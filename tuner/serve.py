"""``qlora-tune serve``: a small REST endpoint for a trained or registered classifier.

``POST /predict`` with ``{"texts": [...]}`` (or MLflow's ``{"dataframe_records": [{"text": ...}]}`` /
``{"inputs": [...]}`` on ``/invocations``) returns ``{"predictions": [{"label", "probabilities"}]}``.
Oversized bodies get 413, wrong schemas 422, each with a one-line ``{"error": ...}``.
Bound to 127.0.0.1; any other host needs ``--insecure``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

from fastapi import (
    Request,  # module level: FastAPI resolves the (string) annotation below
)

from trainables.errors import InputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
    max_texts: int = 256
    max_text_chars: int = 20_000
    max_body_bytes: int = 2_000_000


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_texts(body: bytes, limits: Limits) -> list[str]:
    """Validate a request body into a list of texts, or raise BadRequest (4xx)."""
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
    return texts


def make_app(clf, limits: Limits | None = None):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    app = FastAPI(title="qlora-tune classifier", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one forward pass at a time; requests queue in the thread pool

    def run(texts: list[str]) -> list[dict]:
        with lock:
            pred = clf.predict(texts)
        return [{"label": lab, "probabilities": {n: float(p) for n, p in zip(pred.label_names, row)}}
                for lab, row in zip(pred.labels, pred.probabilities)]

    async def read_body(request: Request) -> bytes:
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

    async def handle(request: Request):
        try:
            texts = parse_texts(await read_body(request), limits)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, e.status)
        preds = await asyncio.get_running_loop().run_in_executor(None, run, texts)
        return {"predictions": preds, "labels": clf.label_names}

    app.post("/predict")(handle)
    app.post("/invocations")(handle)

    @app.get("/health")
    def health():
        return {"status": "ok", "labels": clf.label_names, "approach": clf.cfg.approach}

    return app


def serve(ref: str, host: str, port: int, insecure: bool, limits: Limits) -> None:
    import uvicorn

    from trainables.predict import Classifier
    from tuner.console import console, err_console
    from tuner.refs import local_model_folder

    if host not in LOOPBACK and not insecure:
        raise InputError(f"--host {host}: serving beyond this machine exposes the model unauthenticated; "
                         f"put it behind an authenticating proxy, or pass --insecure to accept that")
    if host not in LOOPBACK:
        err_console.print(f"[yellow]warning[/]: serving on {host}:{port} without authentication (--insecure)")
    clf = Classifier(local_model_folder(ref))
    console.print(f"serving {ref} ({clf.cfg.approach}, labels {clf.label_names}) on http://{host}:{port}/predict")
    uvicorn.run(make_app(clf, limits), host=host, port=port, log_level="warning")
