//! A closed-loop HTTP load generator for the benchmarks: `connections` keep-alive
//! connections, each sending the next request as soon as the last one is answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// What one load run measured.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Answered requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50: Duration,
    /// 95th percentile latency.
    pub p95: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// A duration in milliseconds, two decimals (`12.34 ms`).
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Prints a report as one line: its label, rate, p50 and p99.
pub fn print_line(label: &str, r: &Report) {
    println!(
        "  {label:<34} {:>9.1} /s   p50 {:>9}   p99 {:>9}",
        r.rps,
        ms(r.p50),
        ms(r.p99)
    );
}

/// Sorts `samples` and reads the given quantile.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

/// API keys of the wasp servers the harness started, by address: [`run`] sends the key of
/// its target, as a wasp client would (other servers, such as a peer, get none).
static KEYS: std::sync::Mutex<Vec<(SocketAddr, String)>> = std::sync::Mutex::new(Vec::new());

/// Registers the API key of the server at `addr` (the harness does it for its servers).
pub fn authorize(addr: SocketAddr, key: &str) {
    let mut keys = KEYS.lock().unwrap();
    keys.retain(|(a, _)| *a != addr);
    keys.push((addr, key.to_owned()));
}

fn key_of(addr: SocketAddr) -> Option<String> {
    KEYS.lock()
        .unwrap()
        .iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, k)| format!("Bearer {k}"))
}

/// POSTs `body` to `path` on `addr` from `connections` connections for `duration`.
pub async fn run(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    connections: usize,
    duration: Duration,
) -> Report {
    run_with(addr, path, &[], body, connections, duration).await
}

/// [`run`] with extra request headers (`content-type` is JSON unless they set it).
pub async fn run_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    connections: usize,
    duration: Duration,
) -> Report {
    let headers: Arc<Vec<(String, String)>> = Arc::new(
        headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    let key = key_of(addr);
    let path = path.to_owned();
    drive(connections, duration, move |done| {
        let (path, body, key) = (path.clone(), body.clone(), key.clone());
        let headers = headers.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let mut request = hyper::Request::post(path.as_str()).header("host", "bench");
                if !headers.iter().any(|(k, _)| k == "content-type") {
                    request = request.header("content-type", "application/json");
                }
                for (k, v) in headers.iter() {
                    request = request.header(k.as_str(), v.as_str());
                }
                if let Some(key) = &key {
                    request = request.header("authorization", key.as_str());
                }
                let request = request.body(Full::new(body.clone())).unwrap();
                let started = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                let status = response.status();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                assert!(
                    status.is_success(),
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
                latencies.push(started.elapsed());
            }
            latencies
        }
    })
    .await
}

/// Runs `clients` copies of `client` for `duration`: each sends requests one after another
/// until the flag it is given is set, and answers its latencies.
pub async fn drive<F, Fut>(clients: usize, duration: Duration, client: F) -> Report
where
    F: Fn(Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = Vec<Duration>> + Send + 'static,
{
    let done = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(client(done.clone())))
        .collect();
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    done.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    report(all, started.elapsed())
}

/// The report of `latencies` answered in `elapsed`.
pub fn report(mut latencies: Vec<Duration>, elapsed: Duration) -> Report {
    Report {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: quantile(&mut latencies, 0.50),
        p95: quantile(&mut latencies, 0.95),
        p99: quantile(&mut latencies, 0.99),
    }
}
