//! Dynamic batching: requests arriving within a short window (or while the previous batch
//! runs) are merged into one forward pass, then the outputs are split back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use wasp_core::{ModelInput, ModelOutput};

use crate::{Backend, BackendError, Result};

/// Requests that may wait for a batch slot before callers see back-pressure.
const QUEUE: usize = 4096;

struct Job {
    input: ModelInput,
    rows: usize,
    reply: oneshot::Sender<Result<ModelOutput>>,
}

/// Counters of one batcher.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Forward passes run.
    pub batches: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Rows (sequences) served.
    pub rows: AtomicU64,
}

/// The batcher in front of one loaded backend (one worker).
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    backend: Arc<dyn Backend>,
    stats: Arc<BatchStats>,
}

impl Batcher {
    /// Starts the batching task. `max_batch` counts rows; 1 turns batching off. A batch
    /// closes when it is full or `max_delay` after its first request arrived; while
    /// requests come one at a time (the last batch held one and none queued behind it),
    /// it closes at once instead of waiting for company that is not coming.
    pub fn spawn(backend: Arc<dyn Backend>, max_batch: usize, max_delay: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(BatchStats::default());
        tokio::spawn(run(
            rx,
            backend.clone(),
            max_batch.max(1),
            max_delay,
            stats.clone(),
        ));
        Self { tx, backend, stats }
    }

    /// Runs `input` as part of some batch. A streaming backend's chunks are gathered into
    /// one output (see [`merge_chunks`]).
    pub async fn infer(&self, input: ModelInput) -> Result<ModelOutput> {
        if self.backend.streams() {
            let mut stream = self.backend.stream(input)?;
            let mut chunks = Vec::new();
            while let Some(chunk) = stream.recv().await {
                let chunk = chunk?;
                let last = chunk.last;
                chunks.push(chunk);
                if last {
                    break;
                }
            }
            return Ok(merge_chunks(chunks));
        }
        let rows = self.backend.rows(&input);
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job { input, rows, reply })
            .await
            .map_err(|_| BackendError::Unavailable("the batcher stopped".into()))?;
        answer
            .await
            .map_err(|_| BackendError::Unavailable("the batch was dropped".into()))?
    }

    /// Runs `input` and hands back its output chunks as they come: a streaming backend's
    /// chunks straight from it (it batches on its own, step by step), any other backend's
    /// one output through a batch.
    pub async fn infer_stream(&self, input: ModelInput) -> Result<crate::OutputStream> {
        if self.backend.streams() {
            return self.backend.stream(input);
        }
        let output = self.infer(input).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(output);
        Ok(rx)
    }

    /// The batcher's counters.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Requests waiting for a batch.
    pub fn queued(&self) -> usize {
        QUEUE - self.tx.capacity()
    }

    /// The backend behind it.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}

/// One output from a stream's chunks: tensors of the same name are joined along their
/// first axis (token ids, say) where their types and other dimensions agree, the last
/// chunk's metadata is kept (its counts cover the whole stream), and the result is chunk 0
/// and last.
pub fn merge_chunks(chunks: Vec<ModelOutput>) -> ModelOutput {
    let mut merged = ModelOutput {
        tensors: Vec::new(),
        metadata: None,
        index: 0,
        last: true,
    };
    for chunk in chunks {
        for tensor in chunk.tensors {
            let joined = merged.tensors.iter_mut().find(|t| t.name == tensor.name);
            match joined {
                Some(t)
                    if t.dtype == tensor.dtype
                        && !t.shape.is_empty()
                        && t.shape.len() == tensor.shape.len()
                        && t.shape[1..] == tensor.shape[1..] =>
                {
                    t.shape[0] += tensor.shape[0];
                    t.data.extend_from_slice(&tensor.data);
                }
                // Not joinable: the newest wins.
                Some(t) => *t = tensor,
                None => merged.tensors.push(tensor),
            }
        }
        if chunk.metadata.is_some() {
            merged.metadata = chunk.metadata;
        }
    }
    merged
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    backend: Arc<dyn Backend>,
    max_batch: usize,
    max_delay: Duration,
    stats: Arc<BatchStats>,
) {
    let mut carried: Option<Job> = None;
    // Whether requests are arriving concurrently. Under a single stream of requests the
    // batch window would only add latency, so it is waited out only when the last batch
    // held several requests or more arrived while it ran.
    let mut contended = true;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let closes = Instant::now() + max_delay;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < max_batch {
            // Whatever is queued already joins at once; then wait out the window.
            let next = match rx.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if !contended => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // A timeout closes the batch like an empty queue does.
                    tokio::time::timeout_at(closes, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
            };
            let Some(job) = next else { break };
            if rows + job.rows > max_batch {
                carried = Some(job);
                break;
            }
            rows += job.rows;
            batch.push(job);
        }

        let (inputs, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|j| (j.input, j.reply)).unzip();
        let count = inputs.len();
        let worker = backend.clone();
        let result = tokio::task::spawn_blocking(move || worker.infer_batch(&inputs))
            .await
            .unwrap_or_else(|e| {
                Err(BackendError::Inference(format!(
                    "worker thread failed: {e}"
                )))
            });
        contended = count > 1 || carried.is_some() || !rx.is_empty();
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(count as u64, Ordering::Relaxed);
        stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        match result {
            Ok(outputs) if outputs.len() == count => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(output));
                }
            }
            Ok(outputs) => {
                let e = BackendError::Inference(format!(
                    "backend returned {} outputs for {count} inputs",
                    outputs.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use wasp_core::Tensor;

    use super::*;

    /// Records batch sizes and echoes each input's first tensor.
    struct Echo {
        sizes: Mutex<Vec<usize>>,
        pause: Duration,
    }

    impl Backend for Echo {
        fn infer_batch(&self, inputs: &[ModelInput]) -> Result<Vec<ModelOutput>> {
            self.sizes.lock().unwrap().push(inputs.len());
            std::thread::sleep(self.pause);
            Ok(inputs
                .iter()
                .map(|i| ModelOutput {
                    tensors: i.tensors.clone(),
                    last: true,
                    ..Default::default()
                })
                .collect())
        }

        fn rows(&self, input: &ModelInput) -> usize {
            input.tensors[0].shape[0] as usize
        }

        fn describe(&self) -> String {
            "echo".into()
        }
    }

    fn input(rows: u64, tag: i64) -> ModelInput {
        ModelInput {
            tensors: vec![Tensor::from_i64("x", vec![rows], &vec![tag; rows as usize])],
            parameters: None,
        }
    }

    async fn fire(batcher: Arc<Batcher>, n: i64, rows: u64) -> Vec<i64> {
        let tasks: Vec<_> = (0..n)
            .map(|tag| {
                let b = batcher.clone();
                tokio::spawn(async move { b.infer(input(rows, tag)).await })
            })
            .collect();
        let mut tags = Vec::new();
        for t in tasks {
            let out = t.await.unwrap().unwrap();
            tags.push(out.tensors[0].to_i64().unwrap()[0]);
        }
        tags
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merges_concurrent_requests_and_splits_outputs_back() {
        let echo = Arc::new(Echo {
            sizes: Mutex::default(),
            pause: Duration::from_millis(20),
        });
        let batcher = Arc::new(Batcher::spawn(echo.clone(), 8, Duration::from_millis(50)));
        let tags = fire(batcher.clone(), 16, 1).await;
        assert_eq!(
            tags,
            (0..16).collect::<Vec<_>>(),
            "each caller gets its own output"
        );
        let sizes = echo.sizes.lock().unwrap().clone();
        assert!(sizes.iter().all(|&s| s <= 8), "{sizes:?}");
        assert!(
            sizes.len() <= 4,
            "16 concurrent requests took {} passes: {sizes:?}",
            sizes.len()
        );
        assert_eq!(batcher.stats().requests.load(Ordering::Relaxed), 16);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_batch_one_turns_batching_off_and_rows_count() {
        let echo = Arc::new(Echo {
            sizes: Mutex::default(),
            pause: Duration::from_millis(1),
        });
        let off = Arc::new(Batcher::spawn(echo.clone(), 1, Duration::from_millis(50)));
        fire(off, 6, 1).await;
        assert!(echo.sizes.lock().unwrap().iter().all(|&s| s == 1));

        let rows = Arc::new(Echo {
            sizes: Mutex::default(),
            pause: Duration::from_millis(20),
        });
        let b = Arc::new(Batcher::spawn(rows.clone(), 8, Duration::from_millis(50)));
        fire(b, 8, 3).await;
        // Three rows each: at most two requests (6 rows) fit in a batch of 8.
        assert!(rows.sizes.lock().unwrap().iter().all(|&s| s <= 2));
    }

    #[test]
    fn chunks_merge_along_their_first_axis() {
        let chunk = |ids: &[i64], meta: &str, index: u32, last: bool| ModelOutput {
            tensors: vec![Tensor::from_i64("token_ids", vec![ids.len() as u64], ids)],
            metadata: Some(meta.into()),
            index,
            last,
        };
        let merged = merge_chunks(vec![
            chunk(&[1, 2], "{\"n\":2}", 0, false),
            chunk(&[3], "{\"n\":3}", 1, true),
        ]);
        assert_eq!(merged.tensors.len(), 1);
        assert_eq!(merged.tensors[0].shape, [3]);
        assert_eq!(merged.tensors[0].to_i64().unwrap(), [1, 2, 3]);
        assert_eq!(merged.metadata.as_deref(), Some("{\"n\":3}"));
        assert!(merged.last && merged.index == 0);
        // Tensors that cannot be joined: the newest wins.
        let a = ModelOutput {
            tensors: vec![Tensor::from_f32("x", vec![1, 2], &[1.0, 2.0])],
            ..Default::default()
        };
        let b = ModelOutput {
            tensors: vec![Tensor::from_f32("x", vec![1, 3], &[3.0, 4.0, 5.0])],
            ..Default::default()
        };
        assert_eq!(merge_chunks(vec![a, b]).tensors[0].shape, [1, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_stream_does_not_wait_out_the_window() {
        let echo = Arc::new(Echo {
            sizes: Mutex::default(),
            pause: Duration::ZERO,
        });
        let b = Batcher::spawn(echo, 8, Duration::from_millis(500));
        let started = std::time::Instant::now();
        for tag in 0..5 {
            b.infer(input(1, tag)).await.unwrap();
        }
        // The first request may wait the 500 ms window; the other four must not (2.5 s).
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
    }

    struct Failing;

    impl Backend for Failing {
        fn infer_batch(&self, _: &[ModelInput]) -> Result<Vec<ModelOutput>> {
            Err(BackendError::Inference("boom".into()))
        }

        fn describe(&self) -> String {
            "failing".into()
        }
    }

    #[tokio::test]
    async fn errors_reach_every_caller_and_the_batcher_goes_on() {
        let b = Batcher::spawn(Arc::new(Failing), 4, Duration::ZERO);
        for _ in 0..2 {
            let err = b.infer(ModelInput::default()).await.unwrap_err();
            assert_eq!(err.to_string(), "inference failed: boom");
        }
    }
}
