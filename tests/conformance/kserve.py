"""KServe v2 (Open Inference Protocol) conformance, with NVIDIA's own Triton clients.

Run by tests/tests/kserve.rs against a live wasp serving the MiniLM endpoint `minilm`
(candle backend, text-embeddings processor):

    python kserve.py HOST:PORT API_KEY

It checks health, metadata, JSON and binary inference, the versions routes, text (BYTES)
through the processor giving the vectors of /v1/embeddings, requested outputs, and that
errors (unknown models, versions and outputs, bad shapes and datatypes) reach the client as
clear protocol errors that it can format. It prints what it measured as JSON and exits
non-zero, saying why, on the first failure.
"""

import json
import sys

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from common import check, cosines, openai_embeddings

URL, KEY = sys.argv[1], sys.argv[2]
HEADERS = {"Authorization": f"Bearer {KEY}"}
MODEL = "minilm"
TEXTS = ["The cat sat on the mat.", "KServe clients send tensors."]
IDS = np.array([[101, 7592, 102]], dtype=np.int64)  # [CLS] hello [SEP]
report = {}


def h():
    """The headers of one call: a fresh copy, since the client adds its own to the dict it
    is given (Inference-Header-Content-Length), which would leak into the next call."""
    return dict(HEADERS)


def fails(call, status, says):
    """`call` raises a protocol error with `status` whose message holds `says`."""
    try:
        call()
    except InferenceServerException as e:
        message = e.message()
        check(isinstance(message, str), f"the error is not a message: {message!r}")
        check(says in message, f"the error {message!r} does not say {says!r}")
        check(str(e.status()) == str(status), f"status {e.status()} for {message!r}, not {status}")
        return message
    raise AssertionError(f"no error (expected {status}, saying {says!r})")


def ids_input(binary, shape=None, datatype="INT64", values=IDS):
    tensor = http.InferInput("input_ids", list(values.shape), datatype)
    tensor.set_data_from_numpy(values, binary_data=binary)
    if shape is not None:
        tensor.set_shape(shape)
    return tensor


def text_input(texts, binary):
    tensor = http.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    return tensor


def main():
    client = http.InferenceServerClient(url=URL)

    # Health and metadata.
    check(client.is_server_live(headers=h()), "server not live")
    check(client.is_server_ready(headers=h()), "server not ready")
    server = client.get_server_metadata(headers=h())
    check(server["name"] == "wasp", f"server metadata: {server}")
    check("binary_tensor_data" in server["extensions"], f"extensions: {server}")
    check(client.is_model_ready(MODEL, headers=h()), "model not ready")
    check(client.is_model_ready(MODEL, "v1", headers=h()), "version v1 not ready")
    check(not client.is_model_ready(MODEL, "v9", headers=h()), "version v9 ready")
    metadata = client.get_model_metadata(MODEL, headers=h())
    inputs = {i["name"]: i for i in metadata["inputs"]}
    check(inputs["input_ids"]["datatype"] == "INT64", f"metadata: {metadata}")
    check(inputs["input_ids"]["shape"] == [-1, -1], f"metadata: {metadata}")
    check(metadata["outputs"][0]["shape"] == [-1, -1, 384], f"metadata: {metadata}")
    check(client.get_model_metadata(MODEL, "v1", headers=h())["versions"] == ["v1"], "version metadata")
    report["metadata_inputs"] = sorted(inputs)

    # JSON tensors; then binary ones (the client's default), on both route forms.
    wanted = [http.InferRequestedOutput("last_hidden_state", binary_data=False)]
    as_json = client.infer(MODEL, [ids_input(False)], outputs=wanted, request_id="j1", headers=h())
    check(as_json.get_response()["id"] == "j1", "the id is not echoed")
    hidden = as_json.as_numpy("last_hidden_state")
    check(hidden.shape == (1, 3, 384), f"shape {hidden.shape}")
    as_binary = client.infer(MODEL, [ids_input(True)], headers=h())
    check(np.array_equal(as_binary.as_numpy("last_hidden_state"), hidden), "binary and JSON differ")
    versioned = client.infer(MODEL, [ids_input(True)], model_version="v1", headers=h())
    check(versioned.get_response()["model_version"] == "v1", "version not answered")
    check(np.array_equal(versioned.as_numpy("last_hidden_state"), hidden), "version route differs")

    # Text through the processor: the vectors of /v1/embeddings, in JSON and in binary.
    reference = openai_embeddings(URL, KEY, MODEL, TEXTS)
    for binary in (False, True):
        answer = client.infer(MODEL, [text_input(TEXTS, binary)], headers=h())
        embeddings = answer.as_numpy("embeddings")
        check(embeddings.shape == (2, 384), f"embeddings shape {embeddings.shape}")
        similarity = float(cosines(embeddings, reference).min())
        check(similarity > 0.99999, f"cosine {similarity} against /v1/embeddings")
        report[f"text_cosine_{'binary' if binary else 'json'}"] = similarity

    # Errors: each a protocol error the client formats, with the status it should have.
    report["errors"] = {
        "unknown model": fails(lambda: client.infer("nope", [ids_input(True)], headers=h()), 404, "nope"),
        "unknown version": fails(
            lambda: client.infer(MODEL, [ids_input(True)], model_version="v9", headers=h()), 404, "v9"),
        "unknown output": fails(
            lambda: client.infer(MODEL, [ids_input(True)], outputs=[http.InferRequestedOutput("pooled")],
                                 headers=h()), 400, "pooled"),
        "bad shape (JSON)": fails(
            lambda: client.infer(MODEL, [ids_input(False, shape=[1, 4])], headers=h()), 400, "inputs[0]"),
        "bad shape (binary)": fails(
            lambda: client.infer(MODEL, [ids_input(True, shape=[1, 4])], headers=h()), 400, "binary_data_size"),
        "wrong datatype": fails(
            lambda: client.infer(MODEL, [ids_input(True, datatype="FP32", values=IDS.astype(np.float32))],
                                 headers=h()), 400, "(field `inputs[0]`)"),
        "empty text": fails(lambda: client.infer(MODEL, [text_input([""], False)], headers=h()), 400, "empty"),
        "no key": fails(lambda: client.get_model_metadata(MODEL), 401, "API key"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"KServe conformance failed: {e}", file=sys.stderr)
        sys.exit(1)
