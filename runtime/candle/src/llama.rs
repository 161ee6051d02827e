//! A llama-family decoder over quantized GGUF weights, with the KV cache kept outside the
//! model, one per sequence, so that one forward pass can serve many sequences at different
//! positions (continuous batching).
//!
//! The layer math is candle-transformers' `quantized_llama` (RMS norm, rotary embeddings
//! with GGUF's interleaved layout, grouped-query attention, SwiGLU); what differs is the
//! batching: every sequence's new tokens go through the projections and the MLP as rows of
//! one matrix (the weights are read once per step, whatever the number of sequences), and
//! attention alone runs per sequence, against that sequence's own cache.

use std::io::{Read, Seek};

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;
use rayon::prelude::*;

use crate::qmatmul::QuantMatmul;

/// Positions a sequence's cache grows by when full.
const CACHE_STEP: usize = 256;

/// The shape of a llama model, from its GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Decoder blocks.
    pub layers: usize,
    /// Hidden size.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMS norm epsilon.
    pub rms_eps: f64,
    /// Rotary embedding base.
    pub rope_base: f32,
}

impl LlamaConfig {
    /// Bytes of KV cache a sequence of `positions` holds: keys and values, every layer,
    /// f32, in the cache's allocation steps.
    pub fn kv_bytes(&self, positions: usize) -> u64 {
        let per_token = (2 * self.layers * self.kv_heads * self.head_dim * 4) as u64;
        (positions.div_ceil(CACHE_STEP).max(1) * CACHE_STEP) as u64 * per_token
    }
}

struct Layer {
    /// Query, key and value projections.
    qkv: Fused,
    wo: Linear,
    attn_norm: Norm,
    /// Gate and up projections.
    gate_up: Fused,
    w2: Linear,
    ffn_norm: Norm,
}

/// The weights of a llama-family model, shared by every sequence.
pub struct Llama {
    config: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    output: Linear,
    /// Rotary tables, `[position, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    device: Device,
    /// Whether the element-wise steps run on plain rows ([`Llama::layers_cpu`]): on the
    /// CPU; other devices keep tensor operations.
    rows_path: bool,
}

/// One sequence's KV cache: keys and values of every position it has seen, per layer.
pub struct SequenceCache {
    layers: Vec<LayerCache>,
    len: usize,
}

/// One layer's keys and values, `[position, kv head, head_dim]`.
#[derive(Default)]
struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl LayerCache {
    /// Room for `positions` in steps of [`CACHE_STEP`] positions.
    fn reserve(&mut self, positions: usize, per_position: usize) {
        let wanted = positions.div_ceil(CACHE_STEP) * CACHE_STEP * per_position;
        for v in [&mut self.keys, &mut self.values] {
            if v.capacity() < wanted {
                v.reserve_exact(wanted - v.len());
            }
        }
    }
}

impl SequenceCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a forward pass: its new tokens, its cache, and whether the
/// logits of its last new token are wanted.
pub struct Step<'a> {
    /// Tokens to feed, at positions `cache.len()..`.
    pub tokens: &'a [u32],
    /// The sequence's cache, extended by the pass.
    pub cache: &'a mut SequenceCache,
    /// Whether to compute next-token logits after the last of `tokens`.
    pub logits: bool,
}

fn metadata<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| candle_core::Error::Msg(format!("the GGUF metadata has no `{key}`")))
}

impl Llama {
    /// Reads the model from a GGUF file's content onto `device`.
    pub fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let arch = metadata(ct, "general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            candle_core::bail!("architecture `{arch}` is not llama");
        }
        let u = |key: &str| -> Result<usize> {
            Ok(metadata(ct, &format!("llama.{key}"))?.to_u32()? as usize)
        };
        let heads = u("attention.head_count")?;
        let dim = u("embedding_length")?;
        let head_dim = dim / heads.max(1);
        let config = LlamaConfig {
            layers: u("block_count")?,
            dim,
            heads,
            kv_heads: u("attention.head_count_kv")?,
            head_dim,
            context_length: u("context_length")?,
            vocab: 0,
            rms_eps: f64::from(metadata(ct, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?),
            rope_base: metadata(ct, "llama.rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0),
        };
        if heads == 0 || config.kv_heads == 0 || heads % config.kv_heads != 0 {
            candle_core::bail!(
                "{heads} attention heads cannot share {} key/value heads",
                config.kv_heads
            );
        }
        let embed_q = ct.tensor(reader, "token_embd.weight", device)?;
        let embed = embed_q.dequantize(device)?;
        let vocab = embed.dim(0)?;
        let output = match ct.tensor(reader, "output.weight", device) {
            Ok(t) => t,
            // Tied embeddings.
            Err(_) => embed_q,
        };
        let norm = Norm::from_qtensor(
            ct.tensor(reader, "output_norm.weight", device)?,
            config.rms_eps,
        )?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut q = |name: &str| ct.tensor(reader, &format!("blk.{i}.{name}.weight"), device);
            let qkv = Fused::new(vec![q("attn_q")?, q("attn_k")?, q("attn_v")?])?;
            let gate_up = Fused::new(vec![q("ffn_gate")?, q("ffn_up")?])?;
            layers.push(Layer {
                qkv,
                wo: Linear::new(q("attn_output")?)?,
                attn_norm: Norm::from_qtensor(q("attn_norm")?, config.rms_eps)?,
                gate_up,
                w2: Linear::new(q("ffn_down")?)?,
                ffn_norm: Norm::from_qtensor(q("ffn_norm")?, config.rms_eps)?,
            });
        }
        // Rotary tables for every position the model knows.
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / config.rope_base.powf(i as f32 / head_dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let positions = Tensor::arange(0, config.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((config.context_length, 1))?;
        let angles = positions.broadcast_mul(&theta.reshape((1, head_dim / 2))?)?;
        Ok(Self {
            config: LlamaConfig { vocab, ..config },
            embed: Embedding::new(embed, dim),
            layers,
            norm,
            output: Linear::new(output)?,
            cos: angles.cos()?.flatten_all()?.to_vec1()?,
            sin: angles.sin()?.flatten_all()?.to_vec1()?,
            rows_path: device.is_cpu(),
            device: device.clone(),
        })
    }

    /// Opens a GGUF file and reads the model from it onto `device`.
    pub fn open(path: &std::path::Path, device: &Device) -> Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let content = gguf_file::Content::read(&mut file)?;
        Self::from_gguf(&content, &mut file, device)
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache {
            layers: (0..self.config.layers)
                .map(|_| LayerCache::default())
                .collect(),
            len: 0,
        }
    }

    /// One forward pass over every step's new tokens. Returns the next-token logits of the
    /// steps that asked for them, in order, as rows of a `[n, vocab]` tensor (`None` when
    /// none asked).
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Option<Tensor>> {
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        if tokens.is_empty() {
            return Ok(None);
        }
        for step in steps.iter() {
            if step.cache.len + step.tokens.len() > self.config.context_length {
                candle_core::bail!(
                    "a sequence of {} tokens exceeds the model's context of {}",
                    step.cache.len + step.tokens.len(),
                    self.config.context_length
                );
            }
        }
        let rows = tokens.len();
        let ids = Tensor::from_vec(tokens, rows, &self.device)?;
        let mut x = self.embed.forward(&ids)?;
        let (h, hd) = (self.config.heads, self.config.head_dim);
        if self.rows_path {
            x = self.layers_cpu(x, steps)?;
        }
        let layers = if self.rows_path {
            &[][..]
        } else {
            &self.layers[..]
        };
        for (index, layer) in layers.iter().enumerate() {
            let residual = x.clone();
            let normed = layer.attn_norm.forward(&x)?;
            // [rows, (heads + 2 kv heads) * head_dim]: queries, keys, values side by side.
            let qkv: Vec<f32> = layer
                .qkv
                .forward_joined(&normed)?
                .flatten_all()?
                .to_vec1()?;
            let mut attended = vec![0f32; rows * h * hd];
            self.attend(index, steps, &qkv, &mut attended);
            let attended = Tensor::from_vec(attended, (rows, h * hd), &self.device)?;
            let x1 = (layer.wo.forward(&attended)? + residual)?;
            let normed = layer.ffn_norm.forward(&x1)?;
            let [gate, up] = layer.gate_up.forward::<2>(&normed)?;
            let gate = candle_nn::ops::silu(&gate.contiguous()?)?;
            let up = up.contiguous()?;
            x = (layer.w2.forward(&(gate * up)?)? + x1)?;
        }
        let mut wanted = Vec::new();
        let mut row = 0;
        for step in steps.iter_mut() {
            let t = step.tokens.len();
            step.cache.len += t;
            if step.logits && t > 0 {
                wanted.push((row + t - 1) as u32);
            }
            row += t;
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let count = wanted.len();
        let last = x.index_select(&Tensor::from_vec(wanted, count, &self.device)?, 0)?;
        let logits = self.output.forward(&self.norm.forward(&last)?)?;
        Ok(Some(logits.to_dtype(DType::F32)?))
    }
}

impl Llama {
    /// Every layer on the CPU, the element-wise steps between products done in place on
    /// plain rows: tensor operations of this size cost more in dispatch and thread
    /// hand-offs than in arithmetic. The arithmetic is candle's own, in the same order, so
    /// the results are the same bits as the tensor path's.
    fn layers_cpu(&self, x: Tensor, steps: &mut [Step<'_>]) -> Result<Tensor> {
        let (h, hd) = (self.config.heads, self.config.head_dim);
        let (rows, dim) = x.dims2()?;
        let mut x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let tensor = |v: Vec<f32>, width: usize| Tensor::from_vec(v, (rows, width), &self.device);
        let values = |t: Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = layer.attn_norm.rows(&x, dim);
            let qkv = values(layer.qkv.forward_joined(&tensor(normed, dim)?)?)?;
            let mut attended = vec![0f32; rows * h * hd];
            self.attend(index, steps, &qkv, &mut attended);
            let projected = values(layer.wo.forward(&tensor(attended, h * hd)?)?)?;
            add(&mut x, &projected);
            let normed = layer.ffn_norm.rows(&x, dim);
            let joined = values(layer.gate_up.forward_joined(&tensor(normed, dim)?)?)?;
            let ffn = joined.len() / rows.max(1) / 2;
            let product = values(layer.w2.forward(&tensor(silu_mul(&joined, ffn), ffn)?)?)?;
            add(&mut x, &product);
        }
        tensor(x, dim)
    }

    /// Attention of every step's new tokens at layer `index`: rotary embeddings on their
    /// queries and keys, keys and values appended to the sequence's cache, and each query
    /// against every cached position up to its own. `qkv` holds the projections of all
    /// rows; `out` gets `[rows, heads * head_dim]`. Plain loops rather than tensor ops: per
    /// sequence the work is small, and op dispatch would cost more than the arithmetic.
    /// Sequences run in parallel, and so do the heads of a long prefill.
    fn attend(&self, index: usize, steps: &mut [Step<'_>], qkv: &[f32], out: &mut [f32]) {
        let (h, kvh, hd) = (
            self.config.heads,
            self.config.kv_heads,
            self.config.head_dim,
        );
        let width = (h + 2 * kvh) * hd;
        // Each step's rows of the input and of the output.
        let mut work = Vec::with_capacity(steps.len());
        let mut rest = out;
        let mut row = 0;
        for step in steps.iter_mut() {
            let t = step.tokens.len();
            let (mine, after) = rest.split_at_mut(t * h * hd);
            rest = after;
            work.push((step, &qkv[row * width..(row + t) * width], mine));
            row += t;
        }
        work.par_iter_mut().for_each(|(step, input, output)| {
            let t = step.tokens.len();
            if t == 0 {
                return;
            }
            let pos = step.cache.len;
            let cache = &mut step.cache.layers[index];
            cache.reserve(pos + t, kvh * hd);
            let mut queries = Vec::with_capacity(t * h * hd);
            for (i, row) in input.chunks_exact(width).enumerate() {
                let (q, kv) = row.split_at(h * hd);
                let (k, v) = kv.split_at(kvh * hd);
                let mut q = q.to_vec();
                let mut k = k.to_vec();
                self.rope(&mut q, pos + i);
                self.rope(&mut k, pos + i);
                queries.extend_from_slice(&q);
                cache.keys.extend_from_slice(&k);
                cache.values.extend_from_slice(v);
            }
            let group = h / kvh;
            let scale = 1.0 / (hd as f32).sqrt();
            let head = |hh: usize, dst: &mut [f32]| {
                let kv = hh / group;
                let mut scores = Vec::with_capacity(pos + t);
                for i in 0..t {
                    let q = &queries[(i * h + hh) * hd..(i * h + hh + 1) * hd];
                    let seen = pos + i + 1;
                    scores.clear();
                    for j in 0..seen {
                        let k = &cache.keys[(j * kvh + kv) * hd..(j * kvh + kv + 1) * hd];
                        scores.push(dot(q, k) * scale);
                    }
                    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut dst[i * hd..(i + 1) * hd];
                    o.fill(0.0);
                    for (j, &w) in scores.iter().enumerate() {
                        let v = &cache.values[(j * kvh + kv) * hd..(j * kvh + kv + 1) * hd];
                        let w = w / sum;
                        for (o, &v) in o.iter_mut().zip(v) {
                            *o += w * v;
                        }
                    }
                }
            };
            // Per head: [t, head_dim], then into [t, heads * head_dim].
            let per_head: Vec<Vec<f32>> = if t * (pos + t) > 4096 {
                (0..h)
                    .into_par_iter()
                    .map(|hh| {
                        let mut dst = vec![0f32; t * hd];
                        head(hh, &mut dst);
                        dst
                    })
                    .collect()
            } else {
                (0..h)
                    .map(|hh| {
                        let mut dst = vec![0f32; t * hd];
                        head(hh, &mut dst);
                        dst
                    })
                    .collect()
            };
            for (hh, values) in per_head.iter().enumerate() {
                for i in 0..t {
                    output[(i * h + hh) * hd..(i * h + hh + 1) * hd]
                        .copy_from_slice(&values[i * hd..(i + 1) * hd]);
                }
            }
        });
    }

    /// Rotary embedding of one row of heads at `position`, pairs interleaved (GGUF's llama
    /// layout).
    fn rope(&self, row: &mut [f32], position: usize) {
        let half = self.config.head_dim / 2;
        let cos = &self.cos[position * half..(position + 1) * half];
        let sin = &self.sin[position * half..(position + 1) * half];
        for head in row.chunks_exact_mut(self.config.head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * cos[i] - x1 * sin[i];
                pair[1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// A dot product in eight lanes (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// A weight matrix: this crate's kernel where it applies (Q4_1 and Q8_0 on the CPU),
/// candle's quantized product otherwise (other types, CUDA).
enum Linear {
    Ours(QuantMatmul),
    Candle(QMatMul),
}

/// RMS norm weights, as a tensor (for other devices) and as plain values (for the CPU).
struct Norm {
    weight: Tensor,
    values: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn from_qtensor(weight: candle_core::quantized::QTensor, eps: f64) -> Result<Self> {
        let weight = weight.dequantize(&weight.device())?;
        Ok(Self {
            values: weight.to_device(&Device::Cpu)?.to_vec1()?,
            weight,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }

    /// Every `dim`-wide row of `x` normalised, with `candle_nn::ops::rms_norm`'s
    /// arithmetic in its order.
    fn rows(&self, x: &[f32], dim: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        let row = |(src, dst): (&[f32], &mut [f32])| {
            let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
            let m = (sum2 / dim as f32 + self.eps).sqrt();
            for ((d, s), alpha) in dst.iter_mut().zip(src).zip(&self.values) {
                *d = *s / m * *alpha;
            }
        };
        if x.len() >= PARALLEL_ROWS * dim {
            x.par_chunks_exact(dim)
                .zip(out.par_chunks_exact_mut(dim))
                .for_each(row);
        } else {
            x.chunks_exact(dim)
                .zip(out.chunks_exact_mut(dim))
                .for_each(row);
        }
        out
    }
}

/// Rows from which the element-wise steps are split across threads.
const PARALLEL_ROWS: usize = 16;

/// `x += y`.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `silu(gate) * up` for rows laid out `[gate (ffn) | up (ffn)]`, as candle computes
/// `silu` (`v / (1 + e^-v)`).
fn silu_mul(joined: &[f32], ffn: usize) -> Vec<f32> {
    let rows = joined.len() / (2 * ffn).max(1);
    let mut out = vec![0f32; rows * ffn];
    let row = |(src, dst): (&[f32], &mut [f32])| {
        let (gate, up) = src.split_at(ffn);
        for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *d = g / (1.0 + (-g).exp()) * u;
        }
    };
    if rows >= PARALLEL_ROWS {
        joined
            .par_chunks_exact(2 * ffn)
            .zip(out.par_chunks_exact_mut(ffn))
            .for_each(row);
    } else {
        joined
            .chunks_exact(2 * ffn)
            .zip(out.chunks_exact_mut(ffn))
            .for_each(row);
    }
    out
}

impl Linear {
    fn new(tensor: candle_core::quantized::QTensor) -> Result<Self> {
        match QuantMatmul::new(&tensor)? {
            Some(ours) => Ok(Self::Ours(ours)),
            None => Ok(Self::Candle(QMatMul::from_qtensor(tensor)?)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Ours(m) => m.forward(x),
            Self::Candle(m) => m.forward(x),
        }
    }
}

/// Weights that take the same input, multiplied as one matrix where the kernel allows
/// (their outputs are then columns of one product), else one by one.
enum Fused {
    One(QuantMatmul, Vec<usize>),
    Separate(Vec<Linear>),
}

impl Fused {
    fn new(tensors: Vec<candle_core::quantized::QTensor>) -> Result<Self> {
        let ours = tensors
            .iter()
            .map(QuantMatmul::new)
            .collect::<Result<Option<Vec<_>>>>()?;
        if let Some(parts) = ours {
            let widths: Vec<usize> = parts.iter().map(QuantMatmul::columns_out).collect();
            if let Some(all) = QuantMatmul::concat(parts) {
                return Ok(Self::One(all, widths));
            }
        }
        Ok(Self::Separate(
            tensors
                .into_iter()
                .map(Linear::new)
                .collect::<Result<_>>()?,
        ))
    }

    /// The outputs side by side, `[rows, sum of widths]`, contiguous.
    fn forward_joined(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::One(m, _) => m.forward(x),
            Self::Separate(parts) => {
                let outputs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outputs, D::Minus1)
            }
        }
    }

    /// The `N` outputs, each `[rows, width]`.
    fn forward<const N: usize>(&self, x: &Tensor) -> Result<[Tensor; N]> {
        let outputs: Vec<Tensor> = match self {
            Self::One(m, widths) => {
                let all = m.forward(x)?;
                let mut start = 0;
                let mut parts = Vec::with_capacity(widths.len());
                for &w in widths {
                    parts.push(all.narrow(D::Minus1, start, w)?);
                    start += w;
                }
                parts
            }
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect::<Result<_>>()?,
        };
        outputs
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("expected {N} projections")))
    }
}

/// The index of the largest value of each row of a `[n, vocab]` tensor.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn the_cpu_rows_path_gives_the_tensor_paths_bits() {
        let path = std::env::var_os("WASP_MODELS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models")
            })
            .join("SmolLM2-135M-Instruct/model.gguf");
        assert!(
            path.exists(),
            "{} is missing: run scripts/fetch-model target/models",
            path.display()
        );
        let mut rows_path = Llama::open(&path, &Device::Cpu).unwrap();
        // Two sequences: a 20-token prompt (rows split across threads) beside a 3-token one,
        // then three decoding steps of both together.
        let run = |model: &Llama| -> Vec<f32> {
            let long: Vec<u32> = (0..20).map(|i| 300 + i * 91).collect();
            let short = [1u32, 2, 3];
            let (mut a, mut b) = (model.new_cache(), model.new_cache());
            let mut out = Vec::new();
            let mut logits = |steps: &mut [Step<'_>]| {
                let l = model.forward(steps).unwrap().unwrap();
                out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            };
            logits(&mut [
                Step {
                    tokens: &long,
                    cache: &mut a,
                    logits: true,
                },
                Step {
                    tokens: &short,
                    cache: &mut b,
                    logits: true,
                },
            ]);
            for t in 0..3u32 {
                let (x, y) = ([500 + t], [700 + t]);
                logits(&mut [
                    Step {
                        tokens: &x,
                        cache: &mut a,
                        logits: true,
                    },
                    Step {
                        tokens: &y,
                        cache: &mut b,
                        logits: true,
                    },
                ]);
            }
            out
        };
        let fast = run(&rows_path);
        rows_path.rows_path = false;
        let tensors = run(&rows_path);
        assert_eq!(fast.len(), 4 * 2 * rows_path.config().vocab);
        assert!(fast == tensors, "the rows path changed the logits");
    }
}
