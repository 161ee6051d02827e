//! What smaller pool slots cost a guest's calls: with 4 GiB memory slots (the default while
//! they fit), compiled code checks no bounds (guard pages catch every access out of
//! bounds); with smaller ones (`--slot-memory-mib`, or a `--max-instances` too large for
//! 4 GiB slots), it checks bounds itself. The same `pii-redact` call (regular expressions
//! over 64 KiB of text: a loop of memory loads) runs on both runtimes, in alternating
//! rounds, and the bench prints each p50 and their ratio.
//!
//! Run with `./x bench` (or `cargo bench -p wasp-wasm --bench slots` after `./x build`,
//! which builds `target/processors/pii_redact.wasm`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasp_core::Limits;
use wasp_wasm::{
    BoxFuture, ErrorCode, GuestError, LogBuffer, ModelInput, ModelOutput, ModelRouter, Processor,
    ProcessorSettings, Request, Role, Runtime, RuntimeConfig,
};

/// Model calls are not part of this bench.
struct NoModels;

impl ModelRouter for NoModels {
    fn infer(
        &self,
        _caller: Arc<str>,
        _model: String,
        _input: ModelInput,
    ) -> BoxFuture<'static, Result<Vec<ModelOutput>, GuestError>> {
        Box::pin(async { Err(GuestError::new(ErrorCode::NotFound, "no models here")) })
    }
}

/// The `pii-redact` processor on a runtime whose memory slots are `slot_mib` (the default
/// when `None`).
fn processor(slot_mib: Option<u32>, wasm: &[u8]) -> (Runtime, Processor) {
    let runtime = Runtime::new(RuntimeConfig {
        max_total_instances: 8,
        slot_memory_mib: slot_mib,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let component = runtime.load_component("", wasm).unwrap();
    let processor = runtime
        .processor(
            &component,
            Role::Service,
            ProcessorSettings {
                endpoint: "bench".into(),
                version: "v1".into(),
                env: [
                    (
                        "REDACT_KINDS".to_owned(),
                        "email,phone,card,ipv4".to_owned(),
                    ),
                    ("REDACT_MASK".to_owned(), "[{KIND}]".to_owned()),
                ]
                .into(),
                mounts: Vec::new(),
                allow_hosts: Vec::new(),
                limits: Limits::default(),
                logs: Arc::new(LogBuffer::new(16)),
                models: Arc::new(NoModels),
                group: "bench".into(),
                guest_nanos: Default::default(),
            },
        )
        .unwrap();
    (runtime, processor)
}

/// 64 KiB of prose with an e-mail address, a phone number and an IPv4 address in every
/// line.
fn body() -> Vec<u8> {
    let line = "Call Ann at +1 415 555 0134 or mail ann.lee@example.org from 10.1.2.3 today. ";
    let text: String = line.repeat(64 * 1024 / line.len());
    format!("{{\"text\":{}}}", serde_json::Value::String(text)).into_bytes()
}

fn p50(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("target/processors/pii_redact.wasm");
    let wasm = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `./x build` first)", path.display()));
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, calls) = if quick { (3, 20) } else { (10, 50) };
    let body = body();
    let request = || Request {
        method: "POST".into(),
        path: "/".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kinds = [
        ("4 GiB slots (no bounds checks)", None),
        ("128 MiB slots (bounds checks)", Some(128)),
    ];
    let made: Vec<_> = kinds
        .iter()
        .map(|(_, mib)| processor(*mib, &wasm))
        .collect();
    let mut samples = vec![Vec::new(); kinds.len()];
    rt.block_on(async {
        for (_, processor) in &made {
            // Warm: an instance, and the guest's compiled regular expressions.
            let answer = processor.handle(request()).await.unwrap();
            assert_eq!(
                answer.status,
                200,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            assert!(String::from_utf8_lossy(&answer.body).contains("[EMAIL]"));
        }
        for _ in 0..rounds {
            for (i, (_, processor)) in made.iter().enumerate() {
                for _ in 0..calls {
                    let started = Instant::now();
                    processor.handle(request()).await.unwrap();
                    samples[i].push(started.elapsed());
                }
            }
        }
    });
    println!(
        "slots: one pii-redact call over 64 KiB, p50 of {} calls each, alternating",
        rounds * calls
    );
    let mut medians = Vec::new();
    for ((name, _), s) in kinds.iter().zip(samples.iter_mut()) {
        let m = p50(s);
        println!("  {name:<32} {:>8.2} ms", m.as_secs_f64() * 1e3);
        medians.push(m);
    }
    println!(
        "  bounds checks cost {:.2}x the call's time",
        medians[1].as_secs_f64() / medians[0].as_secs_f64()
    );
}
