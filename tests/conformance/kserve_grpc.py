"""KServe v2 (Open Inference Protocol) conformance over gRPC, with NVIDIA's own Triton client.

Run by tests/tests/kserve.rs against a live wasp serving the MiniLM endpoint `minilm`
(candle backend, text-embeddings processor) over HTTP and, with --grpc-listen, gRPC:

    python kserve_grpc.py HTTP_HOST:PORT GRPC_HOST:PORT API_KEY [GENERATION_MODEL]

It checks health, metadata, inference with raw tensors (the client's only form)
giving the same tensors as the HTTP client, the version forms, text (BYTES) through the
processor giving the vectors of /v1/embeddings, requested outputs, gzip, ModelStreamInfer
(answers matched to requests by id, an error answering its own request while the stream
goes on), text generation as Triton's LLM backends take it (a `text_input` prompt, a
`text_output` answer, whole and on a decoupled stream token by token) when a generation
endpoint is named, and that errors reach the client as gRPC statuses with clear messages.
It prints
what it measured as JSON and exits non-zero, saying why, on the first failure.
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from common import check, cosines, openai_embeddings

HTTP_URL, GRPC_URL, KEY = sys.argv[1], sys.argv[2], sys.argv[3]
GENERATION = sys.argv[4] if len(sys.argv) > 4 else None
# gRPC metadata keys are lower case.
HEADERS = {"authorization": f"Bearer {KEY}"}
MODEL = "minilm"
TEXTS = ["The cat sat on the mat.", "KServe clients send tensors."]
IDS = np.array([[101, 7592, 102]], dtype=np.int64)  # [CLS] hello [SEP]
report = {}


def h():
    return dict(HEADERS)


def fails(call, code, says):
    """`call` raises a gRPC error with `code` (a StatusCode name) whose message holds `says`."""
    try:
        call()
    except InferenceServerException as e:
        message = e.message()
        check(isinstance(message, str), f"the error is not a message: {message!r}")
        check(says in message, f"the error {message!r} does not say {says!r}")
        check(str(e.status()) == f"StatusCode.{code}", f"status {e.status()} for {message!r}, not {code}")
        return message
    raise AssertionError(f"no error (expected {code}, saying {says!r})")


def ids_input(shape=None, datatype="INT64", values=IDS):
    tensor = grpc.InferInput("input_ids", list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    if shape is not None:
        tensor.set_shape(shape)
    return tensor


def generation(client, model):
    """The prompt as a `text_input` BYTES tensor, the answer as `text_output`: whole, then
    the same text streamed, one response per token, the last marked final."""
    def prompt():
        tensor = grpc.InferInput("text_input", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b"The capital of France is"], dtype=np.object_))
        return tensor

    settings = {"max_tokens": 8, "temperature": 0}
    whole = client.infer(model, [prompt()], parameters=settings, headers=h())
    text = whole.as_numpy("text_output")[0].decode()
    check(text != "", "no text generated")
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=h())
    client.async_stream_infer(model, [prompt()], request_id="g1", parameters=settings)
    pieces = []
    while True:
        result, error = answers.get(timeout=60)
        check(error is None, f"stream error: {error}")
        response = result.get_response()
        check(response.id == "g1", f"answer for {response.id!r}")
        pieces.append(result.as_numpy("text_output")[0].decode())
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
    client.stop_stream()
    check("".join(pieces) == text, f"streamed {pieces!r}, whole {text!r}")
    report["generation"] = {"text": text, "responses": len(pieces)}


def text_input(texts):
    tensor = grpc.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def main():
    client = grpc.InferenceServerClient(url=GRPC_URL)

    # Health and metadata.
    check(client.is_server_live(headers=h()), "server not live")
    check(client.is_server_ready(headers=h()), "server not ready")
    server = client.get_server_metadata(headers=h())
    check(server.name == "wasp", f"server metadata: {server}")
    check("binary_tensor_data" in server.extensions, f"extensions: {server}")
    check(client.is_model_ready(MODEL, headers=h()), "model not ready")
    check(client.is_model_ready(MODEL, "v1", headers=h()), "version v1 not ready")
    check(not client.is_model_ready(MODEL, "v9", headers=h()), "version v9 ready")
    check(not client.is_model_ready("nope", headers=h()), "an unknown model is ready")
    metadata = client.get_model_metadata(MODEL, headers=h())
    inputs = {i.name: i for i in metadata.inputs}
    check(inputs["input_ids"].datatype == "INT64", f"metadata: {metadata}")
    check(list(inputs["input_ids"].shape) == [-1, -1], f"metadata: {metadata}")
    check(list(metadata.outputs[0].shape) == [-1, -1, 384], f"metadata: {metadata}")
    check(metadata.platform == "wasp_candle", f"platform: {metadata.platform}")
    versioned = client.get_model_metadata(MODEL, "v1", headers=h())
    check(list(versioned.versions) == ["v1"], f"version metadata: {versioned}")
    report["metadata_inputs"] = sorted(inputs)

    # Tensors: the same as the HTTP client gets, with the id and version answered.
    reference = http.InferenceServerClient(url=HTTP_URL).infer(
        MODEL, [http_ids()], headers={"Authorization": f"Bearer {KEY}"}).as_numpy("last_hidden_state")
    answer = client.infer(MODEL, [ids_input()], request_id="g1", headers=h())
    check(answer.get_response().id == "g1", "the id is not echoed")
    hidden = answer.as_numpy("last_hidden_state")
    check(hidden.shape == (1, 3, 384), f"shape {hidden.shape}")
    check(np.array_equal(hidden, reference), "gRPC and HTTP tensors differ")
    on_v1 = client.infer(MODEL, [ids_input()], model_version="v1", headers=h())
    check(on_v1.get_response().model_version == "v1", "version not answered")
    check(np.array_equal(on_v1.as_numpy("last_hidden_state"), hidden), "version differs")
    asked = client.infer(MODEL, [ids_input()], outputs=[grpc.InferRequestedOutput("last_hidden_state")],
                         headers=h())
    check(np.array_equal(asked.as_numpy("last_hidden_state"), hidden), "requested output differs")
    zipped = client.infer(MODEL, [ids_input()], headers=h(), compression_algorithm="gzip")
    check(np.array_equal(zipped.as_numpy("last_hidden_state"), hidden), "gzip differs")

    # Text through the processor: the vectors of /v1/embeddings.
    embeddings = client.infer(MODEL, [text_input(TEXTS)], headers=h()).as_numpy("embeddings")
    check(embeddings.shape == (2, 384), f"embeddings shape {embeddings.shape}")
    similarity = float(cosines(embeddings, openai_embeddings(HTTP_URL, KEY, MODEL, TEXTS)).min())
    check(similarity > 0.99999, f"cosine {similarity} against /v1/embeddings")
    report["text_cosine"] = similarity

    # A stream: four requests, one of them bad; every one answered, by id.
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=h())
    client.async_stream_infer(MODEL, [ids_input()], request_id="s1")
    client.async_stream_infer(MODEL, [text_input(TEXTS)], request_id="s2")
    client.async_stream_infer("nope", [ids_input()], request_id="s3")
    client.async_stream_infer(MODEL, [ids_input()], request_id="s4", model_version="v1")
    got, failed = {}, []
    for _ in range(4):
        result, error = answers.get(timeout=60)
        if error is not None:
            failed.append(error.message())
        else:
            got[result.get_response().id] = result
    client.stop_stream()
    check(sorted(got) == ["s1", "s2", "s4"], f"stream answers: {sorted(got)}, errors {failed}")
    check(len(failed) == 1 and "nope" in failed[0], f"stream errors: {failed}")
    check(np.array_equal(got["s1"].as_numpy("last_hidden_state"), hidden), "stream tensor differs")
    check(got["s2"].as_numpy("embeddings").shape == (2, 384), "stream embeddings")
    report["stream_error"] = failed[0]

    if GENERATION is not None:
        generation(client, GENERATION)

    # Errors: each a gRPC status with the code a client expects and a clear message.
    report["errors"] = {
        "unknown model": fails(lambda: client.infer("nope", [ids_input()], headers=h()), "NOT_FOUND", "nope"),
        "unknown version": fails(
            lambda: client.infer(MODEL, [ids_input()], model_version="v9", headers=h()), "NOT_FOUND", "v9"),
        "unknown output": fails(
            lambda: client.infer(MODEL, [ids_input()], outputs=[grpc.InferRequestedOutput("pooled")],
                                 headers=h()), "INVALID_ARGUMENT", "pooled"),
        "bad shape": fails(
            lambda: client.infer(MODEL, [ids_input(shape=[1, 4])], headers=h()),
            "INVALID_ARGUMENT", "raw_input_contents[0]"),
        "wrong datatype": fails(
            lambda: client.infer(MODEL, [ids_input(datatype="FP32", values=IDS.astype(np.float32))],
                                 headers=h()), "INVALID_ARGUMENT", "inputs[0]"),
        "empty text": fails(lambda: client.infer(MODEL, [text_input([""])], headers=h()),
                            "INVALID_ARGUMENT", "empty"),
        "no key": fails(lambda: client.get_model_metadata(MODEL), "UNAUTHENTICATED", "API key"),
        "not served": fails(lambda: client.get_model_config(MODEL, headers=h()), "UNIMPLEMENTED",
                            "does not serve `inference.GRPCInferenceService/ModelConfig`"),
        "statistics": fails(lambda: client.get_inference_statistics(MODEL, headers=h()),
                            "UNIMPLEMENTED", "ModelStatistics"),
    }
    print(json.dumps(report))


def http_ids():
    tensor = http.InferInput("input_ids", list(IDS.shape), "INT64")
    tensor.set_data_from_numpy(IDS)
    return tensor


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"KServe gRPC conformance failed: {e}", file=sys.stderr)
        sys.exit(1)
