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
use candle_nn::kv_cache::KvCache;
use candle_transformers::quantized_nn::RmsNorm;

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
    /// Bytes of KV cache one token takes (keys and values, every layer, f32).
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_heads * self.head_dim * 4) as u64
    }
}

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    attn_norm: RmsNorm,
    w1: Linear,
    w2: Linear,
    w3: Linear,
    ffn_norm: RmsNorm,
}

/// The weights of a llama-family model, shared by every sequence.
pub struct Llama {
    config: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One sequence's KV cache: keys and values of every position it has seen, per layer.
pub struct SequenceCache {
    layers: Vec<KvCache>,
    len: usize,
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
        let norm = RmsNorm::from_qtensor(
            ct.tensor(reader, "output_norm.weight", device)?,
            config.rms_eps,
        )?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut q = |name: &str| ct.tensor(reader, &format!("blk.{i}.{name}.weight"), device);
            layers.push(Layer {
                wq: Linear::new(q("attn_q")?)?,
                wk: Linear::new(q("attn_k")?)?,
                wv: Linear::new(q("attn_v")?)?,
                wo: Linear::new(q("attn_output")?)?,
                attn_norm: RmsNorm::from_qtensor(q("attn_norm")?, config.rms_eps)?,
                w1: Linear::new(q("ffn_gate")?)?,
                w2: Linear::new(q("ffn_down")?)?,
                w3: Linear::new(q("ffn_up")?)?,
                ffn_norm: RmsNorm::from_qtensor(q("ffn_norm")?, config.rms_eps)?,
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
            cos: angles.cos()?,
            sin: angles.sin()?,
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
                .map(|_| KvCache::new(2, CACHE_STEP))
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
        let (h, kvh, hd) = (
            self.config.heads,
            self.config.kv_heads,
            self.config.head_dim,
        );
        for (index, layer) in self.layers.iter().enumerate() {
            let residual = x.clone();
            let normed = layer.attn_norm.forward(&x)?;
            let q = layer.wq.forward(&normed)?;
            let k = layer.wk.forward(&normed)?;
            let v = layer.wv.forward(&normed)?;
            let mut outputs = Vec::with_capacity(steps.len());
            let mut row = 0;
            for step in steps.iter_mut() {
                let t = step.tokens.len();
                if t == 0 {
                    continue;
                }
                let pos = step.cache.len;
                // [t, heads * head_dim] -> [1, heads, t, head_dim]
                let shape = |x: &Tensor, heads: usize| -> Result<Tensor> {
                    x.narrow(0, row, t)?
                        .reshape((1, t, heads, hd))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let cos = self.cos.narrow(0, pos, t)?;
                let sin = self.sin.narrow(0, pos, t)?;
                let qs = candle_nn::rotary_emb::rope_i(&shape(&q, h)?, &cos, &sin)?;
                let ks = candle_nn::rotary_emb::rope_i(&shape(&k, kvh)?, &cos, &sin)?;
                let vs = shape(&v, kvh)?;
                let (keys, values) = step.cache.layers[index].append(&ks, &vs)?;
                let total = pos + t;
                // Grouped-query attention without copying the keys per head: the query heads
                // that share a key/value head become rows of one matrix product.
                let group = h / kvh;
                let qg = qs.reshape((kvh, group * t, hd))?;
                // Views into the cache, not copies: the matrix products take strided rows.
                let kg = keys.squeeze(0)?;
                let vg = values.squeeze(0)?;
                let scores = (qg.matmul(&kg.t()?)? / (hd as f64).sqrt())?;
                let scores = if t > 1 {
                    let mask = causal_mask(t, pos, &self.device)?;
                    scores
                        .reshape((kvh, group, t, total))?
                        .broadcast_add(&mask)?
                        .reshape((kvh, group * t, total))?
                } else {
                    scores
                };
                let weights = candle_nn::ops::softmax_last_dim(&scores)?;
                let attended = weights.matmul(&vg)?; // [kvh, group * t, hd]
                let attended = attended
                    .reshape((h, t, hd))?
                    .transpose(0, 1)?
                    .reshape((t, h * hd))?;
                outputs.push(attended);
                row += t;
            }
            let attended = Tensor::cat(&outputs, 0)?;
            let x1 = (layer.wo.forward(&attended)? + residual)?;
            let normed = layer.ffn_norm.forward(&x1)?;
            let gate = candle_nn::ops::silu(&layer.w1.forward(&normed)?)?;
            let up = layer.w3.forward(&normed)?;
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

/// A weight matrix: this crate's kernel where it applies (Q4_1 and Q8_0 on the CPU),
/// candle's quantized product otherwise (other types, CUDA).
enum Linear {
    Ours(QuantMatmul),
    Candle(QMatMul),
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

/// `[t, pos + t]`: 0 where a new token may look (itself, earlier ones, the cache), -inf
/// after it.
fn causal_mask(t: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let total = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, total), device)
}

/// The index of the largest value of each row of a `[n, vocab]` tensor.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1()
}
