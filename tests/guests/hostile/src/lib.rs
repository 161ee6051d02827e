//! A test guest that misbehaves on request, so the tests can check that the host contains
//! it, and that exercises every host import. The request path picks the behaviour.
#![allow(clippy::panic, unconditional_recursion)]

use wasp_sdk::{Error, ModelInput, Processor, Request, Response};

struct Hostile;

/// Recursion through a function pointer: LLVM cannot turn it into a loop, and the frames
/// live on the wasm stack (not in linear memory), so it exhausts the engine's stack.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let next: fn(u64) -> u64 = std::hint::black_box(recurse);
    next(depth + 1).wrapping_mul(3).wrapping_add(depth)
}

impl Processor for Hostile {
    fn init() -> Result<(), Error> {
        if wasp_sdk::config::get("FAIL_INIT").is_some() {
            return Err(Error::internal("init refused by FAIL_INIT"));
        }
        Ok(())
    }

    fn handle(request: Request) -> Result<Response, Error> {
        let path = request.path.split('?').next().unwrap_or("/").to_owned();
        match path.as_str() {
            "/ok" => Ok(Response::text("ok")),
            "/request" => Ok(Response::json(&serde_json::json!({
                "method": request.method,
                "path": request.path,
                "headers": request.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            }))),
            "/status" => Ok(Response::text("teapot")
                .with_status(418)
                .with_header("x-custom", "yes")),
            "/bad-header" => Ok(Response::text("x").with_header("bad header", "v")),
            // A status HTTP has no room for (the body says which).
            "/bad-status" => {
                let status: u16 = request.text()?.trim().parse().unwrap_or(600);
                Ok(Response::text("x").with_status(status))
            }
            // As many headers as the body says.
            "/headers" => {
                let n: usize = request.text()?.trim().parse().unwrap_or(100_000);
                let mut response = Response::text("x");
                for i in 0..n {
                    response = response.with_header(format!("x-h{i}"), "v");
                }
                Ok(response)
            }
            "/echo" => Ok(Response::bytes("application/octet-stream", request.body)),
            // Calls this instance has served: what one request leaves in memory.
            "/count" => {
                static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Ok(Response::text(n.to_string()))
            }
            "/sleep" => {
                let ms: u64 = request.text()?.trim().parse().map_err(|_| {
                    Error::bad_request("the body is the milliseconds to sleep").with_field("body")
                })?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(Response::text("slept"))
            }
            "/trap" => panic!("guest panicked on purpose"),
            "/loop" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "/stack" => Ok(Response::text(recurse(0).to_string())),
            "/alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = vec![0u8; 16 * 1024 * 1024];
                    block[0] = 1;
                    hoard.push(std::hint::black_box(block));
                }
            }
            "/hold" => {
                // Grows its memory by the body's MiB, touches every page, and keeps it.
                let mib: usize = request.text()?.trim().parse().map_err(|_| {
                    Error::bad_request("the body is the MiB to hold").with_field("body")
                })?;
                let block = vec![1u8; mib * 1024 * 1024];
                let sum: usize = block.iter().step_by(4096).map(|&b| usize::from(b)).sum();
                std::mem::forget(std::hint::black_box(block));
                Ok(Response::text(format!("held {mib} MiB ({sum} pages)")))
            }
            "/log" => {
                wasp_sdk::log::warn(&format!("hostile says {}", request.text()?));
                Ok(Response::text("logged"))
            }
            "/config" => Ok(Response::json(&wasp_sdk::config::all())),
            "/env" => Ok(Response::json(&std::env::vars().collect::<Vec<_>>())),
            "/fs" => {
                let target = request.text()?;
                match std::fs::read_to_string(target) {
                    Ok(text) => Ok(Response::text(text)),
                    Err(e) => Err(Error::not_found(format!("cannot read {target}: {e}"))),
                }
            }
            "/net" => {
                let target = request.text()?;
                match std::net::TcpStream::connect(target) {
                    Ok(_) => Ok(Response::text("connected")),
                    Err(e) => Err(Error::unprocessable(format!(
                        "cannot connect to {target}: {e}"
                    ))),
                }
            }
            "/infer" => {
                let model = request.text()?;
                let input = ModelInput {
                    tensors: Vec::new(),
                    parameters: None,
                };
                let outputs = wasp_sdk::infer(model, &input)?;
                Ok(Response::text(format!("{} chunks", outputs.len())))
            }
            other => Err(Error::not_found(format!("no behaviour `{other}`")).with_field("path")),
        }
    }
}

wasp_sdk::processor!(Hostile);
