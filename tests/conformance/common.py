"""What the KServe conformance scripts (kserve.py over HTTP, kserve_grpc.py over gRPC) share."""

import json
import urllib.request

import numpy as np


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def openai_embeddings(url, key, model, texts):
    """The vectors wasp's /v1/embeddings gives for `texts`: the reference for text (BYTES)
    through the processor."""
    request = urllib.request.Request(
        f"http://{url}/v1/embeddings",
        data=json.dumps({"model": model, "input": texts}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        body = json.load(response)
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)
