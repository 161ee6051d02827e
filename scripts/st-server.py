#!/usr/bin/env python3
"""The Python baseline of wasp's embeddings benchmark: an OpenAI-compatible /v1/embeddings
server on sentence-transformers, configured the way its users run one in production.

- Dynamic batching with wasp's own policy: requests that arrive while a batch is being
  formed join it, up to 32 sentences, for at most 2 ms after the first; while requests come
  one at a time (the last batch held one, and none queued behind it) a batch closes at once,
  so batching costs nothing to a single stream. One batching thread runs the model; the
  HTTP threads only parse, wait and answer.
- TCP_NODELAY on every connection and the response in one buffered write, so no answer
  waits for Nagle's algorithm and the client's delayed ACK.
- torch on every core of the machine (`torch.set_num_threads`), inference mode.

    python st-server.py MODEL_DIR PORT [--max-batch 32] [--max-delay-ms 2] [--threads N]
    python st-server.py MODEL_DIR --ceiling [--seconds 5]

`--ceiling` serves nothing: it times `model.encode` in-process on the benchmark's sentence
at batch 1 and at batch 32 and prints sentences per second as JSON, the most any server
around this model could reach.

Environment (outside CI: torch is gigabytes), as used for the README's figures:

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install sentence-transformers==6.2.0
    WASP_BENCH_PYTHON=/tmp/stvenv/bin/python cargo bench -p wasp-tests --bench embeddings
"""

import argparse
import json
import os
import queue
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from sentence_transformers import SentenceTransformer

SENTENCE = "A man is riding a white horse on an enclosed ground."


class Batcher(threading.Thread):
    """Merges concurrent requests into one `encode` call, with wasp's batching policy."""

    def __init__(self, model, max_batch, max_delay):
        super().__init__(daemon=True)
        self.model = model
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.jobs = queue.Queue()

    def submit(self, texts):
        future = Future()
        self.jobs.put((texts, future))
        return future.result()

    def run(self):
        carried = None
        contended = True
        while True:
            first = carried if carried is not None else self.jobs.get()
            carried = None
            closes = time.monotonic() + self.max_delay
            batch = [first]
            rows = len(first[0])
            while rows < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    remaining = closes - time.monotonic()
                    if not contended or remaining <= 0:
                        break
                    try:
                        job = self.jobs.get(timeout=remaining)
                    except queue.Empty:
                        break
                if rows + len(job[0]) > self.max_batch:
                    carried = job
                    break
                rows += len(job[0])
                batch.append(job)
            texts = [t for job in batch for t in job[0]]
            try:
                vectors = self.model.encode(
                    texts,
                    batch_size=max(len(texts), 1),
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                )
                at = 0
                for job_texts, future in batch:
                    future.set_result(vectors[at : at + len(job_texts)])
                    at += len(job_texts)
            except Exception as e:  # answer every waiter, keep serving
                for _, future in batch:
                    future.set_exception(e)
            contended = len(batch) > 1 or carried is not None or not self.jobs.empty()


def serve(model, port, max_batch, max_delay):
    batcher = Batcher(model, max_batch, max_delay)
    batcher.start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY (socketserver sets it in setup()).
        disable_nagle_algorithm = True
        # Headers and body leave in one write: the buffer is flushed after each request.
        wbufsize = 1 << 16

        def log_message(self, *args):
            pass

        def do_POST(self):
            length = int(self.headers.get("content-length", 0))
            try:
                request = json.loads(self.rfile.read(length))
                texts = request["input"]
                if isinstance(texts, str):
                    texts = [texts]
            except (ValueError, KeyError, TypeError) as e:
                return self.reply(400, {"error": {"message": str(e)}})
            vectors = batcher.submit(texts)
            self.reply(
                200,
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": v.tolist()}
                        for i, v in enumerate(vectors)
                    ],
                    "model": request.get("model"),
                },
            )

        def reply(self, status, value):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def ceiling(model, seconds):
    out = {}
    for batch in (1, 32):
        texts = [SENTENCE] * batch
        model.encode(texts, batch_size=batch, normalize_embeddings=True)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.encode(texts, batch_size=batch, normalize_embeddings=True)
            done += batch
        out[f"batch{batch}"] = done / (time.perf_counter() - started)
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ceiling", action="store_true")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = SentenceTransformer(args.model, device="cpu")
    model.eval()
    if args.ceiling:
        ceiling(model, args.seconds)
    else:
        serve(model, args.port, args.max_batch, args.max_delay_ms / 1000)


if __name__ == "__main__":
    main()
