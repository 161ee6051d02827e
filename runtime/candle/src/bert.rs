//! A BERT encoder's forward pass on the CPU, written for serving many short sequences.
//!
//! candle-transformers' `BertModel` pads every sequence of a batch to the longest, runs
//! each step as a separate tensor operation (a fresh buffer each time), and computes GELU
//! with a scalar `f64` erf. Here the tokens of every sequence are packed into one matrix
//! with no padding between sequences, each linear layer is one `gemm` call over all of
//! them, attention runs per sequence over that sequence's own tokens, and the element-wise
//! steps are fused and vectorised: bias, residual add and layer norm in one pass, bias and
//! GELU in another. Weights are loaded through candle's `VarBuilder`, so the same files
//! (safetensors or `pytorch_model.bin`) load either way; on a GPU the backend keeps
//! candle's model.
//!
//! Each token's result depends only on its own sequence, never on what it was batched
//! with.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use gemm::Parallelism;
use rayon::prelude::*;

/// Products with fewer multiply-adds than this run on one thread.
const PARALLEL_MACS: usize = 1 << 20;
/// Query tokens per attention task.
const QUERIES_PER_TASK: usize = 16;

/// An error loading or running the encoder.
#[derive(Debug, thiserror::Error)]
pub enum BertError {
    /// The weights are missing a tensor or have the wrong shapes.
    #[error("{0}")]
    Weights(#[from] candle_core::Error),
    /// The config names something this encoder does not run.
    #[error("{0}")]
    Config(String),
    /// An input is out of the model's range; `field` names it.
    #[error("{message}")]
    Input {
        /// What is wrong.
        message: String,
        /// Which tensor is at fault.
        field: &'static str,
        /// Which sequence (row) it is in.
        row: usize,
    },
}

/// One sequence's token ids, token types and attention mask, all the same length.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    /// Token ids.
    pub ids: &'a [i64],
    /// Token type (segment) ids.
    pub types: &'a [i64],
    /// 1 where a token is attended to, 0 on padding.
    pub mask: &'a [i64],
}

/// Layer norm weights.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

/// A linear layer: weight stored `[inputs, outputs]` row-major.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

struct Layer {
    /// Query, key and value in one product: outputs `[q | k | v]`.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    up: Dense,
    down: Dense,
    output_norm: Norm,
}

/// A BERT encoder on the CPU: token ids in, last hidden states out.
pub struct CpuBert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    vocab: usize,
    positions: usize,
    type_vocab: usize,
}

fn matrix(vb: &VarBuilder, rows: usize, cols: usize, name: &str) -> candle_core::Result<Vec<f32>> {
    vb.get((rows, cols), name)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()
}

fn vector(vb: &VarBuilder, len: usize, name: &str) -> candle_core::Result<Vec<f32>> {
    vb.get(len, name)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1()
}

fn norm(vb: &VarBuilder, hidden: usize, eps: f64) -> candle_core::Result<Norm> {
    Ok(Norm {
        weight: vector(vb, hidden, "weight")?,
        bias: vector(vb, hidden, "bias")?,
        eps: eps as f32,
    })
}

/// Loads torch `Linear` layers (weight `[out, in]`) side by side into one `[in, Σ out]`.
fn dense(parts: &[VarBuilder], inputs: usize, outputs: usize) -> candle_core::Result<Dense> {
    let total = outputs * parts.len();
    let mut weight = vec![0f32; inputs * total];
    let mut bias = Vec::with_capacity(total);
    for (p, vb) in parts.iter().enumerate() {
        let w = matrix(vb, outputs, inputs, "weight")?;
        for o in 0..outputs {
            for i in 0..inputs {
                weight[i * total + p * outputs + o] = w[o * inputs + i];
            }
        }
        bias.extend(vector(vb, outputs, "bias")?);
    }
    Ok(Dense {
        weight,
        bias,
        inputs,
        outputs: total,
    })
}

impl CpuBert {
    /// Loads the encoder from `vb` (the model's root: `embeddings.*`, `encoder.*`, or the
    /// same under `{model_type}.`).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self, BertError> {
        if !Self::runs(config) {
            return Err(BertError::Config(format!(
                "the CPU encoder runs `gelu` (erf) activations and heads that divide the \
                 hidden size, not {:?} with {} heads of a hidden size of {}",
                config.hidden_act, config.num_attention_heads, config.hidden_size
            )));
        }
        match Self::load_at(vb.clone(), config) {
            Ok(model) => Ok(model),
            Err(first) => match &config.model_type {
                Some(prefix) => Self::load_at(vb.pp(prefix), config).map_err(|_| first),
                None => Err(first),
            },
        }
    }

    /// Whether this encoder runs `config`: `gelu` (erf) activations, and attention heads
    /// that divide the hidden size. Others (`gelu_approximate`, `relu`) stay with candle's
    /// model.
    pub fn runs(config: &Config) -> bool {
        matches!(config.hidden_act, HiddenAct::Gelu)
            && config.num_attention_heads > 0
            && config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
    }

    fn load_at(vb: VarBuilder, config: &Config) -> Result<Self, BertError> {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let word = matrix(&emb, config.vocab_size, h, "word_embeddings.weight")?;
        let position = matrix(
            &emb,
            config.max_position_embeddings,
            h,
            "position_embeddings.weight",
        )?;
        let token_type = matrix(
            &emb,
            config.type_vocab_size,
            h,
            "token_type_embeddings.weight",
        )?;
        let embedding_norm = norm(&emb.pp("LayerNorm"), h, eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let own = l.pp("attention.self");
            layers.push(Layer {
                qkv: dense(&[own.pp("query"), own.pp("key"), own.pp("value")], h, h)?,
                attention_out: dense(&[l.pp("attention.output.dense")], h, h)?,
                attention_norm: norm(&l.pp("attention.output.LayerNorm"), h, eps)?,
                up: dense(&[l.pp("intermediate.dense")], h, config.intermediate_size)?,
                down: dense(&[l.pp("output.dense")], config.intermediate_size, h)?,
                output_norm: norm(&l.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Self {
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            hidden: h,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            vocab: config.vocab_size,
            positions: config.max_position_embeddings,
            type_vocab: config.type_vocab_size,
        })
    }

    /// The last hidden state of every token of every sequence, sequences one after another
    /// (`[Σ len, hidden]`, row-major).
    pub fn forward(&self, sequences: &[Sequence<'_>]) -> Result<Vec<f32>, BertError> {
        let h = self.hidden;
        let tokens: usize = sequences.iter().map(|s| s.ids.len()).sum();
        let mut x = vec![0f32; tokens * h];
        let mut at = 0;
        for (row, s) in sequences.iter().enumerate() {
            let len = s.ids.len();
            if len > self.positions {
                return Err(BertError::Input {
                    message: format!(
                        "a sequence of {len} tokens exceeds the model's {} positions",
                        self.positions
                    ),
                    field: "input_ids",
                    row,
                });
            }
            if s.types.len() != len || s.mask.len() != len {
                return Err(BertError::Input {
                    message: "token types and mask must be as long as the ids".into(),
                    field: "attention_mask",
                    row,
                });
            }
            for (p, (&id, &ty)) in s.ids.iter().zip(s.types).enumerate() {
                let id = usize::try_from(id)
                    .ok()
                    .filter(|&i| i < self.vocab)
                    .ok_or_else(|| BertError::Input {
                        message: format!(
                            "token id {id} is outside the vocabulary of {}",
                            self.vocab
                        ),
                        field: "input_ids",
                        row,
                    })?;
                let ty = usize::try_from(ty)
                    .ok()
                    .filter(|&t| t < self.type_vocab)
                    .ok_or_else(|| BertError::Input {
                        message: format!(
                            "token type {ty} is outside the model's {} types",
                            self.type_vocab
                        ),
                        field: "token_type_ids",
                        row,
                    })?;
                let out = &mut x[(at + p) * h..(at + p + 1) * h];
                let (w, pos, t) = (
                    &self.word[id * h..(id + 1) * h],
                    &self.position[p * h..(p + 1) * h],
                    &self.token_type[ty * h..(ty + 1) * h],
                );
                for i in 0..h {
                    out[i] = w[i] + t[i] + pos[i];
                }
            }
            at += len;
        }
        if tokens == 0 {
            return Ok(x);
        }
        layer_norm_rows(&mut x, None, &self.embedding_norm, h);

        let spans = spans(sequences);
        let mut qkv = vec![0f32; tokens * 3 * h];
        let mut context = vec![0f32; tokens * h];
        let mut up = vec![0f32; tokens * self.intermediate];
        let mut projected = vec![0f32; tokens * h];
        for layer in &self.layers {
            // Each product's bias is added in the element-wise step that follows it.
            layer.qkv.product(&x, &mut qkv, tokens);
            add_bias(&mut qkv, &layer.qkv.bias);
            self.attention(&spans, &qkv, &mut context);
            layer
                .attention_out
                .product(&context, &mut projected, tokens);
            let residual = Some((&projected[..], &layer.attention_out.bias[..]));
            layer_norm_rows(&mut x, residual, &layer.attention_norm, h);
            layer.up.product(&x, &mut up, tokens);
            gelu(&mut up, &layer.up.bias);
            layer.down.product(&up, &mut projected, tokens);
            let residual = Some((&projected[..], &layer.down.bias[..]));
            layer_norm_rows(&mut x, residual, &layer.output_norm, h);
        }
        Ok(x)
    }

    /// Self-attention of every sequence over its own tokens; `qkv` rows are `[q | k | v]`.
    fn attention(&self, spans: &[Span<'_>], qkv: &[f32], context: &mut [f32]) {
        let h = self.hidden;
        let heads = self.heads;
        // Tasks: up to QUERIES_PER_TASK query tokens of one sequence; their context rows
        // are one contiguous slice.
        let mut tasks = Vec::new();
        let mut rest = context;
        for span in spans {
            let mut first = 0;
            while first < span.len {
                let count = QUERIES_PER_TASK.min(span.len - first);
                let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(count * h);
                rest = tail;
                tasks.push((span, first, chunk));
                first += count;
            }
        }
        let run = |(span, first, chunk): (&Span<'_>, usize, &mut [f32])| {
            attend_serial(qkv, span, first, chunk, h, heads);
        };
        if tasks.len() > 1 {
            tasks.into_par_iter().for_each(run);
        } else {
            tasks.into_iter().for_each(run);
        }
    }
}

/// Where a sequence's tokens sit in the packed matrix, with its mask as additive biases.
struct Span<'a> {
    start: usize,
    len: usize,
    mask: &'a [i64],
}

fn spans<'a>(sequences: &[Sequence<'a>]) -> Vec<Span<'a>> {
    let mut start = 0;
    sequences
        .iter()
        .map(|s| {
            let span = Span {
                start,
                len: s.ids.len(),
                mask: s.mask,
            };
            start += span.len;
            span
        })
        .collect()
}

impl Dense {
    /// `out = x · W` for `rows` rows (the bias is the caller's to add).
    fn product(&self, x: &[f32], out: &mut [f32], rows: usize) {
        let threads = if rows * self.inputs * self.outputs >= PARALLEL_MACS {
            rayon::current_num_threads()
        } else {
            1
        };
        matmul(
            rows,
            self.inputs,
            self.outputs,
            x,
            &self.weight,
            out,
            threads,
        );
    }
}

/// `out = a · b` for row-major `a` (`[m, k]`), `b` (`[k, n]`) and `out` (`[m, n]`), with
/// the gemm crate candle uses, on `threads` threads (1: this one). The product of every
/// linear layer here, and the benchmark's measure of the machine's peak.
///
/// # Panics
/// When a slice's length is not what `m`, `k` and `n` make it.
pub fn matmul(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], out: &mut [f32], threads: usize) {
    assert!(
        a.len() == m * k && b.len() == k * n && out.len() == m * n,
        "matmul of [{m}, {k}] by [{k}, {n}] given {}, {} and {} elements",
        a.len(),
        b.len(),
        out.len()
    );
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the three slices hold exactly `m × k`, `k × n` and `m × n` elements (checked
    // above), and the strides below describe them as contiguous row-major matrices, so
    // gemm reads and writes only inside them; `out` is borrowed mutably, so it aliases
    // neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Runs `body` compiled for AVX2 and FMA when the CPU has them (the vector width the
/// element-wise loops below are written for), else as portable code.
macro_rules! vectorised {
    ($name:ident, $avx2:ident, fn($($arg:ident: $ty:ty),*) $body:block) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) $body

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features the function is compiled for.
                unsafe { $avx2($($arg),*) };
                return;
            }
            $body
        }
    };
}

/// Lanes the reductions below keep apart so that they vectorise.
const LANES: usize = 8;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for x in chunks {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `e^x`, to about 2 ulp (Cephes' `expf`), branch-free so that loops over it vectorise;
/// 0 below -87.3.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if underflow { 0.0 } else { y * scale }
}

/// `erf(x)` to 1.5e-7 (Abramowitz and Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// Rows per task of the element-wise steps.
const ROWS_PER_TASK: usize = 32;

vectorised!(add_bias_serial, add_bias_avx2, fn(values: &mut [f32], bias: &[f32]) {
    for row in values.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
});

/// Adds `bias` to every row, on every thread.
fn add_bias(values: &mut [f32], bias: &[f32]) {
    values
        .par_chunks_mut(ROWS_PER_TASK * bias.len())
        .for_each(|chunk| add_bias_serial(chunk, bias));
}

vectorised!(gelu_serial, gelu_avx2, fn(values: &mut [f32], bias: &[f32]) {
    for row in values.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            let x = *v + b;
            *v = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
});

/// GELU (erf form) of every row plus `bias`, in place, on every thread.
fn gelu(values: &mut [f32], bias: &[f32]) {
    values
        .par_chunks_mut(ROWS_PER_TASK * bias.len())
        .for_each(|chunk| gelu_serial(chunk, bias));
}

vectorised!(norm_rows, norm_rows_avx2, fn(x: &mut [f32], residual: Option<(&[f32], &[f32])>, norm: &Norm, h: usize) {
    for (r, row) in x.chunks_exact_mut(h).enumerate() {
        if let Some((residual, bias)) = residual {
            for ((v, add), b) in row.iter_mut().zip(&residual[r * h..(r + 1) * h]).zip(bias) {
                *v += add + b;
            }
        }
        let mean = sum(row) / h as f32;
        for v in row.iter_mut() {
            *v -= mean;
        }
        let variance = dot(row, row) / h as f32;
        let scale = 1.0 / (variance + norm.eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = *v * scale * w + b;
        }
    }
});

/// `x = LayerNorm(x + residual + bias)` row by row, on every thread.
fn layer_norm_rows(x: &mut [f32], residual: Option<(&[f32], &[f32])>, norm: &Norm, h: usize) {
    let rows = ROWS_PER_TASK * h;
    x.par_chunks_mut(rows).enumerate().for_each(|(c, chunk)| {
        let residual = residual.map(|(r, b)| (&r[c * rows..c * rows + chunk.len()], b));
        norm_rows(chunk, residual, norm, h);
    });
}

vectorised!(attend_serial, attend_avx2, fn(qkv: &[f32], span: &Span<'_>, first: usize, out: &mut [f32], h: usize, heads: usize) {
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let stride = 3 * h;
    let row = |t: usize| &qkv[(span.start + t) * stride..(span.start + t + 1) * stride];
    let mut scores = vec![0f32; span.len];
    for (q, out) in out.chunks_exact_mut(h).enumerate() {
        let query = row(first + q);
        for head in 0..heads {
            let q = &query[head * d..(head + 1) * d];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let k = &row(j)[h + head * d..h + (head + 1) * d];
                // As transformers: masked keys get the most negative f32 added.
                let bias = if span.mask[j] == 0 { f32::MIN } else { 0.0 };
                *s = dot(q, k) * scale + bias;
                max = max.max(*s);
            }
            let mut total = 0.0;
            for s in scores.iter_mut() {
                *s = exp(*s - max);
                total += *s;
            }
            let out = &mut out[head * d..(head + 1) * d];
            out.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let p = p / total;
                let v = &row(j)[2 * h + head * d..2 * h + (head + 1) * d];
                for (o, v) in out.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BertEmbedder, BertEngine};
    use std::path::PathBuf;
    use wasp_backend::Backend;
    use wasp_core::ModelInput;

    /// all-MiniLM-L6-v2, fetched by `scripts/fetch-model` (as `./x test` does).
    fn minilm() -> PathBuf {
        let dir = std::env::var_os("WASP_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models")
            })
            .join("all-MiniLM-L6-v2");
        assert!(
            dir.join("model.safetensors").exists(),
            "{} is missing: run scripts/fetch-model target/models",
            dir.display()
        );
        dir
    }

    /// Rows of assorted lengths (1 to 130 tokens, one with padding at its end), ids spread
    /// over the vocabulary.
    fn rows() -> Vec<(Vec<i64>, Vec<i64>)> {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as i64
        };
        [1usize, 3, 17, 40, 130, 9]
            .iter()
            .enumerate()
            .map(|(r, &len)| {
                let mut ids: Vec<i64> = (0..len).map(|_| 1000 + next() % 29_000).collect();
                ids[0] = 101;
                let mut mask = vec![1i64; len];
                if r == 5 {
                    // A row padded by the processor: the last four tokens are [PAD].
                    for t in len - 4..len {
                        ids[t] = 0;
                        mask[t] = 0;
                    }
                }
                (ids, mask)
            })
            .collect()
    }

    fn input(rows: &[(Vec<i64>, Vec<i64>)]) -> ModelInput {
        let len = rows[0].0.len();
        let ids: Vec<i64> = rows.iter().flat_map(|r| r.0.clone()).collect();
        let mask: Vec<i64> = rows.iter().flat_map(|r| r.1.clone()).collect();
        let shape = vec![rows.len() as u64, len as u64];
        ModelInput {
            tensors: vec![
                wasp_core::Tensor::from_i64("input_ids", shape.clone(), &ids),
                wasp_core::Tensor::from_i64("attention_mask", shape, &mask),
            ],
            ..ModelInput::default()
        }
    }

    fn hidden(output: &wasp_core::ModelOutput) -> Vec<f32> {
        output.tensors[0].to_f32().unwrap()
    }

    #[test]
    fn the_packed_engine_matches_candles_model_and_batching_changes_nothing() {
        let dir = minilm();
        let packed = BertEmbedder::load_engine(&dir, Device::Cpu, BertEngine::Packed).unwrap();
        let candle = BertEmbedder::load_engine(&dir, Device::Cpu, BertEngine::Candle).unwrap();
        let rows = rows();
        let inputs: Vec<ModelInput> = rows
            .iter()
            .map(|r| input(std::slice::from_ref(r)))
            .collect();
        let batched = packed.infer_batch(&inputs).unwrap();
        let mut worst_candle: f32 = 0.0;
        let mut worst_batch: f32 = 0.0;
        for (i, one) in inputs.iter().enumerate() {
            let alone = hidden(&packed.infer_batch(std::slice::from_ref(one)).unwrap()[0]);
            let reference = hidden(&candle.infer_batch(std::slice::from_ref(one)).unwrap()[0]);
            let together = hidden(&batched[i]);
            assert_eq!(
                batched[i].tensors[0].shape,
                vec![1, rows[i].0.len() as u64, 384]
            );
            let valid = rows[i].1.iter().filter(|&&m| m == 1).count() * 384;
            for t in 0..valid {
                worst_candle = worst_candle.max((alone[t] - reference[t]).abs());
            }
            for (a, b) in alone.iter().zip(&together) {
                worst_batch = worst_batch.max((a - b).abs());
            }
        }
        eprintln!("packed vs candle: {worst_candle:e}; batched vs alone: {worst_batch:e}");
        assert!(
            worst_candle < 1e-4,
            "packed vs candle differ by {worst_candle}"
        );
        assert!(
            worst_batch <= 1e-5,
            "batched vs alone differ by {worst_batch}"
        );

        // Several rows in one input (the processor's own padding) come back in order.
        let same = rows
            .iter()
            .filter(|r| r.0.len() >= 9)
            .map(|r| (r.0[..9].to_vec(), r.1[..9].to_vec()))
            .collect::<Vec<_>>();
        let many = hidden(&packed.infer_batch(&[input(&same)]).unwrap()[0]);
        let reference = hidden(&candle.infer_batch(&[input(&same)]).unwrap()[0]);
        let worst = many
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "multi-row input differs by {worst}");
    }

    #[test]
    fn configs_the_packed_engine_does_not_run_stay_with_candles_model() {
        let dir = minilm();
        let relu = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let config = text.replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\"");
        assert_ne!(config, text, "the fixture's config names its activation");
        std::fs::write(relu.path().join("config.json"), config).unwrap();
        std::os::unix::fs::symlink(
            dir.join("model.safetensors"),
            relu.path().join("model.safetensors"),
        )
        .unwrap();
        let model = BertEmbedder::load(relu.path(), Device::Cpu).unwrap();
        assert_eq!(model.engine(), BertEngine::Candle);
        let one = input(&[(vec![101, 2000, 102], vec![1, 1, 1])]);
        assert_eq!(
            model.infer_batch(&[one]).unwrap()[0].tensors[0].shape,
            [1, 3, 384]
        );
        let err = BertEmbedder::load_engine(relu.path(), Device::Cpu, BertEngine::Packed)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("gelu"), "{err}");
        assert_eq!(
            BertEmbedder::load(&dir, Device::Cpu).unwrap().engine(),
            BertEngine::Packed
        );
    }

    #[test]
    fn ids_outside_the_model_are_refused_with_the_input_named() {
        let packed = BertEmbedder::load_engine(&minilm(), Device::Cpu, BertEngine::Packed).unwrap();
        let good = input(&[(vec![101, 2000, 102], vec![1, 1, 1])]);
        let bad = input(&[(vec![101, 30_522, 102], vec![1, 1, 1])]);
        match packed.infer_batch(&[good.clone(), bad]) {
            Err(wasp_backend::BackendError::BadInput { message, field }) => {
                assert!(message.contains("outside the vocabulary"), "{message}");
                assert_eq!(field.as_deref(), Some("inputs[1].input_ids"));
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        let negative = input(&[(vec![101, -1, 102], vec![1, 1, 1])]);
        assert!(packed.infer_batch(&[negative]).is_err());
        let long = input(&[(vec![101; 513], vec![1; 513])]);
        let err = packed.infer_batch(&[long]).unwrap_err().to_string();
        assert!(err.contains("512 positions"), "{err}");
        assert!(packed.infer_batch(&[good]).is_ok());
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp: f64 = 0.0;
        let mut worst_erf: f64 = 0.0;
        for i in -20_000..=20_000 {
            let x = i as f32 / 1000.0;
            let e = f64::from(x).exp();
            worst_exp = worst_exp.max(((f64::from(exp(x)) - e) / e).abs());
            worst_erf = worst_erf.max((f64::from(erf(x)) - libm::erf(f64::from(x))).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf error {worst_erf}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert!(exp(100.0).is_finite());
    }

    #[test]
    fn gelu_matches_its_definition_on_both_paths() {
        let values: Vec<f32> = (-4000..4000).map(|i| i as f32 / 500.0).collect();
        let mut fast = values.clone();
        gelu(&mut fast, &[0.0; 16]);
        let mut portable = values.clone();
        for v in portable.iter_mut() {
            let x = *v;
            *v = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        }
        for ((x, f), p) in values.iter().zip(&fast).zip(&portable) {
            let want = 0.5 * f64::from(*x) * (1.0 + libm::erf(f64::from(*x) / 2f64.sqrt()));
            assert!(
                (f64::from(*f) - want).abs() < 1e-6,
                "gelu({x}) = {f}, want {want}"
            );
            assert!((f - p).abs() < 1e-6, "gelu({x}): {f} vs {p}");
        }
    }
}
