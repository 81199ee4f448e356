"""Load test of a running classifier server: N concurrent clients for T seconds, on loopback, bounded.

    python benchmarks/serve_load.py URL [--clients 20] [--seconds 60] [--batch 4] [--procs 4]

Clients are threads spread over ``--procs`` processes (so that the load generator's own GIL does not
cap the rate); each sends requests of ``--batch`` texts in a loop until the time is up. Prints
requests, errors, texts/s and latency percentiles (JSON). ``load()`` is what benchmarks/serve_bench.py
calls.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import threading
import time
import urllib.request

TEXTS = ["The new update is fantastic.", "My order arrived broken.", "The store opens at nine.",
         "What a lovely surprise!", "The train was cancelled again.", "The report covers last month.",
         "Shares of the bank fell sharply after the earnings miss.", "Analysts raise their price target."]


def _worker(url: str, clients: int, first: int, stop_at: float, batch: int, out) -> None:
    lat, errors, lock = [], [], threading.Lock()

    def client(i: int) -> None:
        body = json.dumps({"texts": [TEXTS[(i + k) % len(TEXTS)] for k in range(batch)]}).encode()
        while time.time() < stop_at:
            t = time.perf_counter()
            msg = ""
            try:
                req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    ok = r.status == 200 and len(json.loads(r.read())["predictions"]) == batch
            except Exception as e:  # noqa: BLE001 - counted as an error
                ok, msg = False, repr(e)[:200]
            with lock:
                (lat.append(time.perf_counter() - t) if ok else errors.append(msg))

    threads = [threading.Thread(target=client, args=(first + i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((lat, errors))


def load(url: str, clients: int = 20, seconds: float = 60, batch: int = 4, procs: int = 4) -> dict:
    """Run the load; returns {clients, seconds, requests, errors, texts_per_s, p50_ms, p99_ms, ...}."""
    procs = max(1, min(procs, clients))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop_at = time.time() + seconds
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=_worker, args=(url, n, sum(shares[:i]), stop_at, batch, out))
          for i, n in enumerate(shares)]
    t0 = time.time()
    for p in ps:
        p.start()
    lat, errors = [], []
    for _ in ps:
        a, b = out.get(timeout=seconds + 600)
        lat += a
        errors += b
    for p in ps:
        p.join()
    wall = time.time() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
    return {"clients": clients, "texts_per_request": batch, "seconds": round(wall, 1), "requests": len(lat),
            "errors": len(errors), "texts_per_s": round(len(lat) * batch / wall, 1),
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
            "first_error": errors[0] if errors else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--procs", type=int, default=4)
    a = ap.parse_args()
    print(json.dumps(load(a.url.rstrip("/"), a.clients, a.seconds, a.batch, a.procs), indent=2))


if __name__ == "__main__":
    main()
