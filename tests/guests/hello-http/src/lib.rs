//! What `examples/hello` does, as a `wasi:http/proxy` component: reads `{"name": ...}` and
//! answers `{"greeting": "hello, <name>!"}`. The isolation benchmark serves it with
//! `wasmtime serve` (a new instance per request) beside wasp's per-request mode.

use std::io::{Read, Write};

use serde::Deserialize;
use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Hello);

struct Hello;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    name: String,
}

/// The status and JSON body for a request body.
fn answer(body: &[u8]) -> (u16, serde_json::Value) {
    match serde_json::from_slice::<Input>(body) {
        Ok(input) if input.name.is_empty() => (
            422,
            serde_json::json!({ "error": { "code": "unprocessable", "message": "name must not be empty", "field": "name" } }),
        ),
        Ok(input) => (
            200,
            serde_json::json!({ "greeting": format!("hello, {}!", input.name) }),
        ),
        Err(e) => (
            400,
            serde_json::json!({ "error": { "code": "bad_request", "message": e.to_string() } }),
        ),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let mut bytes = Vec::new();
        if let Ok(body) = request.consume() {
            if let Ok(mut stream) = body.stream() {
                let _ = stream.read_to_end(&mut bytes);
            }
            IncomingBody::finish(body);
        }
        let (status, json) = answer(&bytes);
        let headers = Fields::new();
        let _ = headers.set("content-type", &[b"application/json".to_vec()]);
        let response = OutgoingResponse::new(headers);
        let _ = response.set_status_code(status);
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(mut out) = body.write() {
            let _ = out.write_all(json.to_string().as_bytes());
            let _ = out.flush();
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
