//! Text generation with continuous batching: the `generate` task of the candle backend.
//!
//! One engine thread per loaded model runs decoding steps. At every step, sequences join
//! (their prompts are prefilled, in chunks, inside the same forward pass as the running
//! sequences' next tokens) and leave (finished, or cancelled because their client went
//! away) the running batch, as vLLM and TGI schedule them. A cap on running sequences and
//! on KV-cache memory holds the rest in a queue; a running sequence whose cache would
//! overflow the budget is preempted (its cache dropped, to be recomputed when there is room
//! again), youngest first.
//!
//! Input: an `input_ids` tensor (the prompt's token ids, `[n]` or `[1, n]`), and generation
//! settings as the JSON `parameters` ([`Params`]). Output: chunks with a `token_ids` tensor
//! and JSON metadata ([`ChunkMeta`]). A streamed request gets a chunk per token, except
//! that tokens are held back while their bytes end inside a UTF-8 character or could be the
//! start of a stop sequence, so that every chunk decodes to whole characters and a stop
//! sequence is always inside the last chunk, for the processor to cut. A request that does
//! not stream gets one chunk with every token.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use wasp_backend::{Backend, BackendError, GenerationLoad, OutputStream, Result};
use wasp_core::{ModelInput, ModelOutput, Tensor};

use crate::llama::{Llama, SequenceCache, Step};

/// Most prompt tokens prefilled in one step, so that a long prompt (or a burst of them)
/// does not stall the sequences that are decoding for long: on two CPU cores a step of 64
/// prompt tokens takes about a third of a second.
const PREFILL_CHUNK: usize = 64;

/// How a version's generation engine is sized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineLimits {
    /// Most sequences in the running batch (1: no batching, one sequence at a time).
    pub max_running: usize,
    /// KV-cache memory for all running sequences, in bytes.
    pub kv_cache_bytes: u64,
}

/// Generation settings, from the input's `parameters` (OpenAI's names and meanings).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Most tokens to generate; up to the context by default.
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2; 0 picks the most likely token (greedy). Default 1.
    pub temperature: Option<f32>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this, 0 to 1.
    pub top_p: Option<f32>,
    /// Only the `top_k` most likely tokens (0: all).
    pub top_k: Option<u32>,
    /// Penalty on tokens already in the sequence (1: none; above 1 discourages them).
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler: the same seed, prompt and settings give the same tokens.
    pub seed: Option<u64>,
    /// Text that ends generation where it appears (not part of the output).
    pub stop: Vec<String>,
    /// Token ids that end generation, besides the model's end-of-sequence token.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the end-of-sequence token.
    pub ignore_eos: bool,
    /// A chunk per token (true) or one chunk at the end (false, the default).
    pub stream: bool,
}

/// The metadata of every output chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChunkMeta {
    /// Why generation ended (`stop`: end-of-sequence or a stop sequence; `length`:
    /// `max_tokens` or the context), on the last chunk only.
    pub finish_reason: Option<String>,
    /// The stop sequence that ended generation, if one did; the last chunk's text holds
    /// it, and the output ends where it begins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated so far.
    pub completion_tokens: u32,
    /// From arrival to the first generated token, in milliseconds (last chunk only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// From the first generated token to the last, in milliseconds (last chunk only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_ms: Option<f64>,
    /// Token counts in OpenAI's form, for usage metering (last chunk only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Both.
    pub total_tokens: u32,
}

fn bad(message: impl Into<String>, field: &str) -> BackendError {
    BackendError::bad_input(message, field)
}

impl Params {
    /// Parses and checks the input's `parameters`.
    pub fn parse(parameters: Option<&str>) -> Result<Self> {
        let params: Self = match parameters {
            None => Self::default(),
            Some(text) => serde_json::from_str(text)
                .map_err(|e| bad(format!("generation parameters: {e}"), "parameters"))?,
        };
        if let Some(t) = params.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(bad(
                "temperature must be between 0 and 2",
                "parameters.temperature",
            ));
        }
        if let Some(p) = params.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(bad(
                "top_p must be above 0 and at most 1",
                "parameters.top_p",
            ));
        }
        if let Some(r) = params.repetition_penalty
            && !(r > 0.0 && r.is_finite())
        {
            return Err(bad(
                "repetition_penalty must be above 0",
                "parameters.repetition_penalty",
            ));
        }
        if params.max_tokens == Some(0) {
            return Err(bad(
                "max_tokens must be at least 1",
                "parameters.max_tokens",
            ));
        }
        if params.stop.iter().any(String::is_empty) {
            return Err(bad("a stop sequence cannot be empty", "parameters.stop"));
        }
        Ok(params)
    }
}

/// The bytes each token stands for (GPT-2 byte-level BPE: every byte is a printable
/// character in the vocabulary), and which tokens are control tokens (shown as nothing).
pub struct Vocabulary {
    bytes: Vec<Vec<u8>>,
    /// The end-of-sequence token.
    pub eos: u32,
}

/// GPT-2's map from bytes to the characters that stand for them in the vocabulary.
fn byte_chars() -> Vec<char> {
    let mut chars = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    chars
}

impl Vocabulary {
    /// Reads the vocabulary from GGUF metadata (`tokenizer.ggml.*`, model `gpt2`).
    pub fn from_gguf(ct: &gguf_file::Content) -> std::result::Result<Self, String> {
        let get = |key: &str| {
            ct.metadata
                .get(key)
                .ok_or_else(|| format!("the GGUF metadata has no `{key}`"))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| e.to_string())?;
        if model != "gpt2" {
            return Err(format!(
                "tokenizer model `{model}` is not supported (byte-level BPE, `gpt2`, is)"
            ));
        }
        let tokens = get("tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|e| e.to_string())?;
        let types = get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().map_err(|e| e.to_string()))
            .ok();
        let eos = get("tokenizer.ggml.eos_token_id")?
            .to_u32()
            .map_err(|e| e.to_string())?;
        let mut reverse = std::collections::HashMap::new();
        for (b, c) in byte_chars().into_iter().enumerate() {
            reverse.insert(c, b as u8);
        }
        let mut bytes = Vec::with_capacity(tokens.len());
        for (i, token) in tokens.iter().enumerate() {
            let text = token.to_string().map_err(|e| e.to_string())?;
            let control = types
                .as_ref()
                .and_then(|t| t.get(i))
                .and_then(|t| t.to_i32().ok())
                == Some(3);
            bytes.push(if control {
                Vec::new()
            } else {
                text.chars()
                    .map(|c| reverse.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    // Not byte-level (user-defined tokens): the text itself.
                    .unwrap_or_else(|| text.as_bytes().to_vec())
            });
        }
        Ok(Self { bytes, eos })
    }

    /// The bytes of `token` (nothing for control tokens and unknown ids).
    pub fn bytes(&self, token: u32) -> &[u8] {
        self.bytes.get(token as usize).map_or(&[], Vec::as_slice)
    }

    /// Tokens in the vocabulary.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A small, fast, stable pseudo-random generator (SplitMix64): seeded runs repeat exactly
/// on every build and platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks the next token from one row of logits.
fn sample(logits: &mut [f32], params: &Params, seen: &[bool], rng: &mut Rng) -> u32 {
    if let Some(penalty) = params.repetition_penalty
        && penalty != 1.0
    {
        for (logit, _) in logits.iter_mut().zip(seen).filter(|(_, s)| **s) {
            *logit = if *logit > 0.0 {
                *logit / penalty
            } else {
                *logit * penalty
            };
        }
    }
    let temperature = params.temperature.unwrap_or(1.0);
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32
    };
    if temperature == 0.0 {
        return argmax();
    }
    // Candidates, most likely first, cut by top-k, then softmax with the temperature and
    // cut by top-p.
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let key = |i: &u32| logits[*i as usize];
    let k = match params.top_k {
        Some(k) if k > 0 && (k as usize) < order.len() => k as usize,
        _ => order.len(),
    };
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, |a, b| key(b).total_cmp(&key(a)));
        order.truncate(k);
    }
    order.sort_unstable_by(|a, b| key(b).total_cmp(&key(a)));
    let max = key(&order[0]);
    let mut probs: Vec<f32> = order
        .iter()
        .map(|&i| ((logits[i as usize] - max) / temperature).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let top_p = params.top_p.unwrap_or(1.0);
    let mut kept = probs.len();
    if top_p < 1.0 {
        let mut sum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            sum += p;
            if sum >= top_p {
                kept = i + 1;
                break;
            }
        }
    }
    let mass: f32 = probs[..kept].iter().sum();
    let mut target = rng.next_f32() * mass;
    for (i, p) in probs[..kept].iter().enumerate() {
        target -= p;
        if target <= 0.0 {
            return order[i];
        }
    }
    order[kept - 1]
}

/// A request waiting for room.
struct Pending {
    prompt: Vec<u32>,
    params: Params,
    tx: mpsc::UnboundedSender<Result<ModelOutput>>,
    arrived: Instant,
}

/// A sequence in (or preempted from) the running batch.
struct Sequence {
    /// Tokens to have in the cache before the next sample: the prompt, plus what was
    /// generated before a preemption.
    context: Vec<u32>,
    prompt_tokens: u32,
    params: Params,
    tx: mpsc::UnboundedSender<Result<ModelOutput>>,
    arrived: Instant,
    cache: Option<SequenceCache>,
    /// Tokens of `context` already in the cache.
    fed: usize,
    /// The last sampled token, to be fed at the next step.
    next: Option<u32>,
    /// Generated tokens (all of them, for the penalty and for non-streamed answers).
    generated: Vec<u32>,
    /// Tokens generated but not yet sent, and their bytes.
    held: Vec<u32>,
    held_bytes: Vec<u8>,
    seen: Vec<bool>,
    index: u32,
    rng: Rng,
    first_token: Option<Instant>,
    limit: usize,
}

impl Sequence {
    fn meta(&self, finish: Option<&str>, stop: Option<String>) -> ChunkMeta {
        let last = finish.is_some();
        ChunkMeta {
            finish_reason: finish.map(str::to_owned),
            stop,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated.len() as u32,
            ttft_ms: last
                .then(|| self.first_token.map(|t| ms(t - self.arrived)))
                .flatten(),
            decode_ms: last
                .then(|| self.first_token.map(|t| ms(t.elapsed())))
                .flatten(),
            usage: last.then(|| Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.generated.len() as u32,
                total_tokens: self.prompt_tokens + self.generated.len() as u32,
            }),
        }
    }

    /// Sends a chunk; false when the client has gone.
    fn send(&mut self, tokens: &[u32], meta: ChunkMeta) -> bool {
        let last = meta.finish_reason.is_some();
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let chunk = ModelOutput {
            tensors: vec![Tensor::from_i64("token_ids", vec![ids.len() as u64], &ids)],
            metadata: serde_json::to_string(&meta).ok(),
            index: self.index,
            last,
        };
        self.index += 1;
        self.tx.send(Ok(chunk)).is_ok()
    }

    /// Cache positions this sequence needs for its next step.
    fn positions_needed(&self) -> usize {
        let cached = self.cache.as_ref().map_or(0, SequenceCache::len);
        let feeding = if self.fed < self.context.len() {
            (self.context.len() - self.fed).min(PREFILL_CHUNK)
        } else {
            usize::from(self.next.is_some())
        };
        cached + feeding
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whether `bytes` end inside a UTF-8 character (more bytes could complete it).
fn ends_inside_char(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(_) => false,
        Err(e) => e.error_len().is_none(),
    }
}

/// Whether some stop sequence starts in the tail of `bytes` without being complete there.
fn may_start_stop(bytes: &[u8], stops: &[String]) -> bool {
    stops.iter().any(|stop| {
        let stop = stop.as_bytes();
        (1..stop.len().min(bytes.len() + 1)).any(|n| bytes.ends_with(&stop[..n]))
    })
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_bytes: AtomicU64,
}

struct Queue {
    incoming: Vec<Pending>,
    closed: bool,
}

/// A loaded generation model and the engine thread that schedules it.
pub struct Generator {
    shared: Arc<Shared>,
    name: String,
    device: Device,
    context_length: usize,
    limits: EngineLimits,
}

impl Drop for Generator {
    fn drop(&mut self) {
        if let Ok(mut queue) = self.shared.queue.lock() {
            queue.closed = true;
        }
        self.shared.wake.notify_all();
    }
}

impl Generator {
    /// Loads `model.gguf` (or the only `.gguf` file) from `dir` onto `device` and starts the
    /// engine thread (blocking).
    pub fn load(dir: &Path, device: Device, limits: EngineLimits) -> Result<Self> {
        let path = gguf_path(dir)?;
        let mut file = std::fs::File::open(&path)
            .map_err(|e| BackendError::Load(format!("cannot open {}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            BackendError::Load(format!("{} is not a GGUF file: {e}", path.display()))
        })?;
        let vocabulary = Vocabulary::from_gguf(&content)
            .map_err(|e| BackendError::Load(format!("{}: {e}", path.display())))?;
        let model = Llama::from_gguf(&content, &mut file, &device)
            .map_err(|e| BackendError::Load(format!("{}: {e}", path.display())))?;
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let context_length = model.config().context_length;
        tracing::info!(
            model = %name, device = ?device, layers = model.config().layers,
            vocab = vocabulary.len(), context_length, "loaded llama model"
        );
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                incoming: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            kv_bytes: AtomicU64::new(0),
        });
        let engine = Engine {
            model,
            vocabulary,
            shared: shared.clone(),
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
        };
        std::thread::Builder::new()
            .name(format!("wasp-generate-{name}"))
            .spawn(move || engine.run())
            .map_err(|e| BackendError::Load(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            shared,
            name,
            device,
            context_length,
            limits,
        })
    }

    /// The model's context length, in tokens.
    pub fn context_length(&self) -> usize {
        self.context_length
    }
}

fn gguf_path(dir: &Path) -> Result<std::path::PathBuf> {
    let direct = dir.join("model.gguf");
    if direct.is_file() {
        return Ok(direct);
    }
    let found: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| BackendError::Load(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(BackendError::Load(format!(
            "{} has no GGUF file (model.gguf)",
            dir.display()
        ))),
        _ => Err(BackendError::Load(format!(
            "{} has several GGUF files; name one model.gguf",
            dir.display()
        ))),
    }
}

/// The prompt's token ids from `input_ids` (`[n]` or `[1, n]`, any integer type).
fn prompt(input: &ModelInput) -> Result<Vec<u32>> {
    let field = "input_ids";
    let tensor = input
        .tensor(field)
        .ok_or_else(|| bad("input has no `input_ids` tensor", field))?;
    if !(tensor.shape.len() == 1 || (tensor.shape.len() == 2 && tensor.shape[0] == 1)) {
        return Err(bad(
            format!(
                "`input_ids` must have shape [n] or [1, n], not {:?}",
                tensor.shape
            ),
            field,
        ));
    }
    let ids = tensor.to_i64().map_err(|e| bad(e.to_string(), field))?;
    if ids.is_empty() {
        return Err(bad("the prompt has no tokens", field));
    }
    ids.into_iter()
        .map(|id| {
            u32::try_from(id).map_err(|_| bad(format!("token id {id} is out of range"), field))
        })
        .collect()
}

impl Backend for Generator {
    fn describe(&self) -> String {
        format!("{} on {:?}", self.name, self.device)
    }

    fn streams(&self) -> bool {
        true
    }

    fn stream(&self, input: ModelInput) -> Result<OutputStream> {
        let prompt = prompt(&input)?;
        let params = Params::parse(input.parameters.as_deref())?;
        if prompt.len() >= self.context_length {
            return Err(bad(
                format!(
                    "the prompt has {} tokens; the model's context holds {} (with room for \
                     one generated token)",
                    prompt.len(),
                    self.context_length
                ),
                "input_ids",
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut queue = self
                .shared
                .queue
                .lock()
                .map_err(|_| BackendError::Unavailable("the engine failed".into()))?;
            if queue.closed {
                return Err(BackendError::Unavailable("the engine stopped".into()));
            }
            queue.incoming.push(Pending {
                prompt,
                params,
                tx,
                arrived: Instant::now(),
            });
        }
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        self.shared.wake.notify_one();
        Ok(rx)
    }

    fn infer_batch(&self, inputs: &[ModelInput]) -> Result<Vec<ModelOutput>> {
        let streams = inputs
            .iter()
            .map(|i| self.stream(i.clone()))
            .collect::<Result<Vec<_>>>()?;
        streams
            .into_iter()
            .map(|mut rx| {
                let mut chunks = Vec::new();
                while let Some(chunk) = rx.blocking_recv() {
                    let chunk = chunk?;
                    let last = chunk.last;
                    chunks.push(chunk);
                    if last {
                        break;
                    }
                }
                Ok(wasp_backend::merge_chunks(chunks))
            })
            .collect()
    }

    fn load(&self) -> Option<GenerationLoad> {
        Some(GenerationLoad {
            running: self.shared.running.load(Ordering::Relaxed),
            waiting: self.shared.waiting.load(Ordering::Relaxed),
            kv_cache_bytes: self.shared.kv_bytes.load(Ordering::Relaxed),
            kv_cache_capacity: self.limits.kv_cache_bytes,
        })
    }
}

struct Engine {
    model: Llama,
    vocabulary: Vocabulary,
    shared: Arc<Shared>,
    limits: EngineLimits,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Engine {
    fn run(mut self) {
        loop {
            let incoming = {
                let Ok(mut queue) = self.shared.queue.lock() else {
                    return;
                };
                while !queue.closed
                    && queue.incoming.is_empty()
                    && self.running.is_empty()
                    && self.waiting.is_empty()
                {
                    queue = match self.shared.wake.wait(queue) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                }
                if queue.closed {
                    return;
                }
                std::mem::take(&mut queue.incoming)
            };
            for pending in incoming {
                let seq = self.sequence(pending);
                self.waiting.push_back(seq);
            }
            if let Err(e) = self.step() {
                // A failed forward pass fails the sequences in it; the engine goes on.
                tracing::error!("generation step failed: {e}");
                for seq in self.running.drain(..) {
                    let _ = seq.tx.send(Err(BackendError::Inference(e.to_string())));
                }
            }
            self.publish();
        }
    }

    fn sequence(&self, pending: Pending) -> Sequence {
        let context = self.model.config().context_length;
        let room = context - pending.prompt.len();
        let limit = pending
            .params
            .max_tokens
            .map_or(room, |m| (m as usize).min(room));
        let seed = pending.params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ (std::ptr::from_ref(&pending) as u64)
        });
        let mut seen = vec![false; self.model.config().vocab];
        for &t in &pending.prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Sequence {
            prompt_tokens: pending.prompt.len() as u32,
            context: pending.prompt,
            params: pending.params,
            tx: pending.tx,
            arrived: pending.arrived,
            cache: None,
            fed: 0,
            next: None,
            generated: Vec::new(),
            held: Vec::new(),
            held_bytes: Vec::new(),
            seen,
            index: 0,
            rng: Rng(seed),
            first_token: None,
            limit,
        }
    }

    fn publish(&self) {
        let config = self.model.config();
        let used: u64 = self
            .running
            .iter()
            .filter_map(|s| s.cache.as_ref())
            .map(|c| config.kv_bytes(c.len()))
            .sum();
        self.shared.kv_bytes.store(used, Ordering::Relaxed);
        self.shared
            .running
            .store(self.running.len(), Ordering::Relaxed);
        let incoming = self.shared.queue.lock().map_or(0, |q| q.incoming.len());
        self.shared
            .waiting
            .store(self.waiting.len() + incoming, Ordering::Relaxed);
    }

    /// Admits, preempts, runs one forward pass, samples, and sends what is ready.
    fn step(&mut self) -> candle_core::Result<()> {
        // Clients that went away free their sequences at once.
        self.running.retain(|s| !s.tx.is_closed());
        self.waiting.retain(|s| !s.tx.is_closed());
        let config = self.model.config();
        let budget = self.limits.kv_cache_bytes;
        let need = |s: &Sequence| config.kv_bytes(s.positions_needed());
        // Preempt the youngest running sequences while the batch would overflow the cache.
        while self.running.len() > 1 && self.running.iter().map(need).sum::<u64>() > budget {
            if let Some(mut seq) = self.running.pop() {
                tracing::debug!("preempting a sequence: the KV cache is full");
                seq.cache = None;
                seq.context.extend(seq.next.take());
                seq.fed = 0;
                self.waiting.push_front(seq);
            }
        }
        // Admit, oldest first, while there is room.
        let mut used: u64 = self.running.iter().map(need).sum();
        while self.running.len() < self.limits.max_running.max(1) {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let wanted = need(front);
            if used + wanted > budget && !self.running.is_empty() {
                break;
            }
            if let Some(mut seq) = self.waiting.pop_front() {
                if wanted > budget {
                    let _ = seq.tx.send(Err(BackendError::bad_input(
                        format!(
                            "the prompt needs {wanted} bytes of KV cache; the budget is \
                             {budget} (backend.kv_cache_mib)"
                        ),
                        "input_ids",
                    )));
                    continue;
                }
                used += wanted;
                seq.cache = Some(self.model.new_cache());
                self.running.push(seq);
            }
        }
        if self.running.is_empty() {
            return Ok(());
        }

        // One pass: prompt chunks for sequences still prefilling, one token for the rest.
        let mut prefill_left = PREFILL_CHUNK.max(1);
        let mut plans: Vec<(usize, Vec<u32>, bool)> = Vec::with_capacity(self.running.len());
        for (i, seq) in self.running.iter().enumerate() {
            if seq.fed < seq.context.len() {
                if prefill_left == 0 {
                    continue;
                }
                let n = (seq.context.len() - seq.fed).min(prefill_left);
                prefill_left -= n;
                let tokens = seq.context[seq.fed..seq.fed + n].to_vec();
                plans.push((i, tokens, seq.fed + n == seq.context.len()));
            } else if let Some(next) = seq.next {
                plans.push((i, vec![next], true));
            }
        }
        let logits = {
            let mut caches: Vec<Option<&mut SequenceCache>> =
                self.running.iter_mut().map(|s| s.cache.as_mut()).collect();
            let mut steps = Vec::with_capacity(plans.len());
            for (i, tokens, wants) in &plans {
                if let Some(cache) = caches[*i].take() {
                    steps.push(Step {
                        tokens,
                        cache,
                        logits: *wants,
                    });
                }
            }
            self.model.forward(&mut steps)?
        };
        let rows: Vec<Vec<f32>> = match logits {
            Some(l) => l.to_vec2()?,
            None => Vec::new(),
        };
        let mut rows = rows.into_iter();
        let mut finished = Vec::new();
        for (i, tokens, wants) in plans {
            let seq = &mut self.running[i];
            if seq.fed < seq.context.len() {
                seq.fed += tokens.len();
            } else {
                seq.next = None;
            }
            if !wants {
                continue;
            }
            let Some(mut row) = rows.next() else { break };
            let token = sample(&mut row, &seq.params, &seq.seen, &mut seq.rng);
            if !emit(seq, token, &self.vocabulary) {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            self.running.remove(i);
        }
        Ok(())
    }
}

/// Takes a sampled token: sends what is ready, and returns whether the sequence goes on.
fn emit(seq: &mut Sequence, token: u32, vocabulary: &Vocabulary) -> bool {
    if seq.first_token.is_none() {
        seq.first_token = Some(Instant::now());
    }
    let is_eos = !seq.params.ignore_eos && token == vocabulary.eos;
    let stops_here = is_eos || seq.params.stop_token_ids.contains(&token);
    seq.generated.push(token);
    if let Some(s) = seq.seen.get_mut(token as usize) {
        *s = true;
    }
    let mut finish: Option<(&str, Option<String>)> = None;
    if stops_here {
        finish = Some(("stop", None));
    } else {
        let bytes = vocabulary.bytes(token);
        seq.held.push(token);
        seq.held_bytes.extend_from_slice(bytes);
        // Only a match that ends in this token's bytes is new.
        let longest = seq.params.stop.iter().map(String::len).max().unwrap_or(0);
        let from = seq
            .held_bytes
            .len()
            .saturating_sub(bytes.len() + longest.saturating_sub(1));
        let tail = &seq.held_bytes[from..];
        let matched = seq.params.stop.iter().find(|s| {
            let s = s.as_bytes();
            tail.windows(s.len()).any(|w| w == s)
        });
        if let Some(stop) = matched {
            finish = Some(("stop", Some(stop.clone())));
        } else if seq.generated.len() >= seq.limit {
            finish = Some(("length", None));
        }
    }
    if let Some((reason, stop)) = finish {
        let meta = seq.meta(Some(reason), stop);
        // The end-of-sequence (or stop) token itself is not part of the output.
        let tokens = if seq.params.stream {
            std::mem::take(&mut seq.held)
        } else {
            let shown = seq.generated.len() - usize::from(stops_here);
            seq.generated[..shown].to_vec()
        };
        seq.send(&tokens, meta);
        return false;
    }
    seq.next = Some(token);
    if seq.params.stream
        && !ends_inside_char(&seq.held_bytes)
        && !may_start_stop(&seq.held_bytes, &seq.params.stop)
    {
        let tokens = std::mem::take(&mut seq.held);
        seq.held_bytes.clear();
        let meta = seq.meta(None, None);
        return seq.send(&tokens, meta);
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn parameters_are_checked_and_named() {
        assert_eq!(Params::parse(None).unwrap(), Params::default());
        let p = Params::parse(Some(r#"{"temperature":0,"stop":["\n"],"stream":true}"#)).unwrap();
        assert_eq!(p.temperature, Some(0.0));
        for (json, field) in [
            (r#"{"temperature":3}"#, "parameters.temperature"),
            (r#"{"top_p":0}"#, "parameters.top_p"),
            (r#"{"max_tokens":0}"#, "parameters.max_tokens"),
            (r#"{"stop":[""]}"#, "parameters.stop"),
            (
                r#"{"repetition_penalty":-1}"#,
                "parameters.repetition_penalty",
            ),
            (r#"{"nope":1}"#, "parameters"),
        ] {
            match Params::parse(Some(json)) {
                Err(BackendError::BadInput { field: Some(f), .. }) => {
                    assert_eq!(f, field, "{json}")
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn sampling_is_greedy_at_zero_and_repeatable_with_a_seed() {
        let logits = vec![0.1, 2.0, 1.9, -1.0];
        let greedy = Params {
            temperature: Some(0.0),
            ..Params::default()
        };
        let seen = vec![false; 4];
        assert_eq!(sample(&mut logits.clone(), &greedy, &seen, &mut Rng(1)), 1);
        // A penalty on token 1 makes token 2 the most likely.
        let penalised = Params {
            repetition_penalty: Some(1.5),
            ..greedy.clone()
        };
        let seen1 = vec![false, true, false, false];
        assert_eq!(
            sample(&mut logits.clone(), &penalised, &seen1, &mut Rng(1)),
            2
        );
        // top_k 1 is greedy whatever the temperature.
        let top1 = Params {
            top_k: Some(1),
            temperature: Some(1.5),
            ..Params::default()
        };
        for seed in 0..20 {
            assert_eq!(sample(&mut logits.clone(), &top1, &seen, &mut Rng(seed)), 1);
        }
        // Seeded draws repeat; different seeds draw differently.
        let warm = Params::default();
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..32)
                .map(|_| sample(&mut logits.clone(), &warm, &seen, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top_p small enough keeps only the most likely token.
        let nucleus = Params {
            top_p: Some(0.01),
            ..Params::default()
        };
        assert_eq!(sample(&mut logits.clone(), &nucleus, &seen, &mut Rng(3)), 1);
    }

    #[test]
    fn held_bytes_wait_for_whole_characters_and_possible_stops() {
        assert!(ends_inside_char(&"é".as_bytes()[..1]));
        assert!(!ends_inside_char("é".as_bytes()));
        let stops = vec!["END".to_owned()];
        assert!(may_start_stop(b"the E", &stops));
        assert!(may_start_stop(b"the EN", &stops));
        assert!(!may_start_stop(b"the", &stops));
        assert!(!may_start_stop(b"the END", &stops)); // complete: matched elsewhere
    }

    #[test]
    fn byte_level_characters_cover_every_byte_once() {
        let chars = byte_chars();
        let unique: std::collections::HashSet<_> = chars.iter().collect();
        assert_eq!(unique.len(), 256);
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        assert_eq!(chars[b'a' as usize], 'a');
    }
}
