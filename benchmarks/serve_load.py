"""Load test of `qlora-tune serve` (issue 7): N concurrent clients for T seconds on loopback, bounded.

    python benchmarks/serve_load.py MODEL_REF [--clients 20] [--seconds 60] [--batch 4]

Starts the server as a real process on 127.0.0.1, sends requests of `--batch` texts from each client
in a loop until the time is up, and prints requests, errors and latency percentiles (JSON).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The new update is fantastic.", "My order arrived broken.", "The store opens at nine.",
         "What a lovely surprise!", "The train was cancelled again.", "The report covers last month."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tuner.cli", "serve", a.model, "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.5)
        lat, errors, lock = [], [], threading.Lock()
        stop = time.time() + a.seconds

        def client(i: int) -> None:
            body = json.dumps({"texts": [TEXTS[(i + k) % len(TEXTS)] for k in range(a.batch)]}).encode()
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=120) as r:
                        ok = r.status == 200 and len(json.loads(r.read())["predictions"]) == a.batch
                except Exception as e:  # noqa: BLE001
                    ok, msg = False, repr(e)
                with lock:
                    (lat.append(time.perf_counter() - t) if ok else errors.append(msg))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
        print(json.dumps({"clients": a.clients, "seconds": round(wall, 1), "requests": len(lat), "errors": len(errors),
                          "texts_per_s": round(len(lat) * a.batch / wall, 1), "p50_ms": round(q[49] * 1000, 1),
                          "p99_ms": round(q[98] * 1000, 1), "first_error": errors[0] if errors else None}, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
