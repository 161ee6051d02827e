//! A KServe v2 model server for the container backend's tests and benchmark: serves one
//! candle model (all-MiniLM-L6-v2 embeddings) over HTTP, as a model container would.
//!
//! ```text
//! model-server --model DIR [--host 127.0.0.1] [--port N] [--ready-after-ms N]
//! ```
//!
//! - `GET /v2/health/ready`: 200 once loaded and `--ready-after-ms` has passed, else 503.
//! - `GET /v2/health/live`: 200 until `POST /admin/sick`, then 503 for good.
//! - `POST /v2/models/<any>/infer`: a KServe v2 inference request; the answer's outputs are
//!   the model's.
//! - `/echo...`, any method: `201` and `x-model-server: echo`, with the request as it
//!   arrived as JSON (`method`, `path` with the query, `headers`, `body`).
//! - `GET /stream?n=N&ms=M`: `N` server-sent events (`data: <i>`), `M` ms apart.
//! - SIGTERM: stops accepting, finishes the requests in flight, exits 0.
//!
//! The port is `--port`, else `$PORT` (what wasp's process driver sets), else 8080.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use wasp_backend::{Backend, BackendFactory, LoadContext};
use wasp_core::kserve::{tensor_from_object, tensor_object};
use wasp_core::{BackendSpec, CandleBackend, ModelInput};

struct State {
    model: Arc<dyn Backend>,
    ready_at: Instant,
    sick: AtomicBool,
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn input(body: &[u8]) -> Result<ModelInput, String> {
    let request: Value = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    let inputs = request["inputs"].as_array().ok_or("inputs: missing")?;
    let tensors = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            tensor_from_object(t).map_err(|(field, e)| format!("inputs[{i}].{field}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parameters = match &request["parameters"] {
        Value::Null => None,
        other => Some(other.to_string()),
    };
    Ok(ModelInput {
        tensors,
        parameters,
    })
}

/// The request as it arrived, as JSON.
async fn echo(request: Request<Incoming>) -> Response<Body> {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.to_string());
    let headers: serde_json::Map<String, Value> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                Value::from(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            )
        })
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let mut response = reply(
        StatusCode::CREATED,
        json!({"method": method, "path": path, "headers": headers, "body": body}),
    );
    response.headers_mut().insert(
        "x-model-server",
        hyper::header::HeaderValue::from_static("echo"),
    );
    response
}

/// `n` server-sent events, `ms` milliseconds apart.
fn events(query: &str) -> Response<Body> {
    let param = |key: &str, default: u64| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(default)
    };
    let (n, ms) = (param("n", 3), param("ms", 10));
    let stream = futures_util::stream::unfold(0u64, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let frame = hyper::body::Frame::data(Bytes::from(format!("data: {i}\n\n")));
        Some((Ok::<_, Infallible>(frame), i + 1))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (_, p) if p.starts_with("/echo") => echo(request).await,
        (&Method::GET, "/stream") => events(request.uri().query().unwrap_or("")),
        (&Method::GET, "/v2/health/ready") => {
            if Instant::now() >= state.ready_at {
                reply(StatusCode::OK, json!({"ready": true}))
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false}))
            }
        }
        (&Method::GET, "/v2/health/live") => {
            if state.sick.load(Ordering::Relaxed) {
                reply(StatusCode::SERVICE_UNAVAILABLE, json!({"live": false}))
            } else {
                reply(StatusCode::OK, json!({"live": true}))
            }
        }
        (&Method::POST, "/admin/sick") => {
            state.sick.store(true, Ordering::Relaxed);
            eprintln!("model-server: told to fail its liveness probe");
            reply(StatusCode::OK, json!({"sick": true}))
        }
        (&Method::POST, p) if p.starts_with("/v2/models/") && p.ends_with("/infer") => {
            let body = match request.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
            };
            let input = match input(&body) {
                Ok(i) => i,
                Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e})),
            };
            let model = state.model.clone();
            let out = tokio::task::spawn_blocking(move || model.infer_batch(&[input])).await;
            match out {
                Ok(Ok(mut outputs)) if !outputs.is_empty() => {
                    let output = outputs.remove(0);
                    let tensors: Vec<Value> =
                        output.tensors.iter().filter_map(tensor_object).collect();
                    let mut body = json!({"model_name": "model", "outputs": tensors});
                    if let Some(meta) = output
                        .metadata
                        .and_then(|m| serde_json::from_str::<Value>(&m).ok())
                    {
                        body["parameters"] = meta;
                    }
                    reply(StatusCode::OK, body)
                }
                Ok(Ok(_)) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "no output"}),
                ),
                Ok(Err(wasp_backend::BackendError::BadInput { message, .. })) => {
                    reply(StatusCode::BAD_REQUEST, json!({"error": message}))
                }
                Ok(Err(e)) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": e.to_string()}),
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": e.to_string()}),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no route {path}")}),
        ),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut model, mut port, mut ready_after) = (None, None, 0u64);
    let mut host = std::net::IpAddr::from([127, 0, 0, 1]);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => model = Some(value()?),
            "--port" => port = Some(value()?.parse::<u16>()?),
            "--ready-after-ms" => ready_after = value()?.parse()?,
            "--host" => host = value()?.parse()?,
            other => bail!("unknown argument `{other}`"),
        }
    }
    let model = model.context("--model DIR is required")?;
    let port = match port {
        Some(p) => p,
        None => std::env::var("PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(8080),
    };
    let spec = BackendSpec::Candle(CandleBackend {
        model,
        task: "embeddings".into(),
        device: "cpu".into(),
        max_sequences: None,
        kv_cache_mib: None,
    });
    let loaded = wasp_candle::CandleFactory
        .load(&spec, &LoadContext::new(std::env::temp_dir()))
        .context("loading the model")?;
    let state = Arc::new(State {
        model: loaded,
        ready_at: Instant::now() + Duration::from_millis(ready_after),
        sick: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((host, port))).await?;
    eprintln!("model-server: listening on {}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let service = hyper::service::service_fn(move |r| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, r).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(conn);
            }
            _ = term.recv() => break,
        }
    }
    eprintln!("model-server: SIGTERM, finishing the requests in flight");
    drop(listener);
    graceful.shutdown().await;
    eprintln!("model-server: stopped");
    Ok(())
}
