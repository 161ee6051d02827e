#!/usr/bin/env python3
"""A minimal OpenAI-compatible /v1/embeddings server on sentence-transformers: the Python
baseline that `./x bench` compares wasp against. Each request is encoded as it arrives
(threaded HTTP server, torch on every core), the way such a service is usually written.

    python st-server.py MODEL_DIR PORT
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], device="cpu")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        request = json.loads(self.rfile.read(length))
        texts = request["input"]
        if isinstance(texts, str):
            texts = [texts]
        vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        body = json.dumps(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": v.tolist()}
                    for i, v in enumerate(vectors)
                ],
                "model": request.get("model"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
