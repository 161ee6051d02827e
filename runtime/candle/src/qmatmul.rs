//! Matrix products with Q4_1 and Q8_0 weights on the CPU, computed as llama.cpp computes
//! them, and fast when several rows (sequences) share a pass.
//!
//! llama.cpp quantizes the activations of each row to 8 bits per block of 32 (Q8_1 against
//! Q4_1 weights, Q8_0 against Q8_0), takes integer dot products per block, and scales
//! them. candle does the same in principle, but its Q4_1 path is scalar code and rounds
//! the activation blocks' sums twice, and a 135M-parameter model is sensitive enough for
//! that to change greedy tokens. This kernel follows llama.cpp's AVX2 quantization
//! exactly (ties to even; the block sum scaled in f32 and rounded to f16 once).
//!
//! Speed: the weights are unpacked once per block and multiplied into every row of the
//! pass while they sit in registers, so a decoding step over many sequences reads the
//! weights once (continuous batching pays); columns are split across the CPU's threads.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// Elements per quantization block.
const BLOCK: usize = 32;
/// Rows whose products are computed together against one unpacked weight block.
const TILE: usize = 8;
/// Rows from which quantizing and reordering are split across threads.
const PARALLEL_ROWS: usize = 16;
/// Columns per parallel task.
const COLUMNS_PER_TASK: usize = 16;

/// The weight's blocks, unpacked into arrays for fast access.
#[derive(Debug)]
enum Weights {
    /// Per block: scale `d`, minimum `m`, and 16 bytes of two 4-bit levels each (low
    /// nibbles are elements 0..16, high nibbles 16..32).
    Q4_1 {
        d: Vec<f32>,
        m: Vec<f32>,
        qs: Vec<[u8; 16]>,
    },
    /// Per block: scale `d` and 32 signed levels.
    Q8_0 { d: Vec<f32>, qs: Vec<[i8; 32]> },
}

/// A `[n, k]` quantized weight that multiplies `[rows, k]` f32 activations into
/// `[rows, n]`.
#[derive(Debug)]
pub struct QuantMatmul {
    weights: Weights,
    n: usize,
    k: usize,
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl QuantMatmul {
    /// The weight in this kernel's form, if it is a CPU Q4_1 or Q8_0 matrix whose rows are
    /// whole blocks; `None` otherwise (the caller keeps candle's own product).
    pub fn new(tensor: &QTensor) -> Result<Option<Self>> {
        let dims = tensor.shape().dims();
        let [n, k] = dims[..] else {
            return Ok(None);
        };
        if k % BLOCK != 0 || !tensor.device().is_cpu() {
            return Ok(None);
        }
        let blocks = n * k / BLOCK;
        let weights = match tensor.dtype() {
            GgmlDType::Q4_1 => {
                let raw = tensor.data()?;
                if raw.len() != blocks * 20 {
                    return Ok(None);
                }
                let mut d = Vec::with_capacity(blocks);
                let mut m = Vec::with_capacity(blocks);
                let mut qs = Vec::with_capacity(blocks);
                for block in raw.chunks_exact(20) {
                    d.push(f16_at(block, 0));
                    m.push(f16_at(block, 2));
                    let mut q = [0u8; 16];
                    q.copy_from_slice(&block[4..20]);
                    qs.push(q);
                }
                Weights::Q4_1 { d, m, qs }
            }
            GgmlDType::Q8_0 => {
                let raw = tensor.data()?;
                if raw.len() != blocks * 34 {
                    return Ok(None);
                }
                let mut d = Vec::with_capacity(blocks);
                let mut qs = Vec::with_capacity(blocks);
                for block in raw.chunks_exact(34) {
                    d.push(f16_at(block, 0));
                    let mut q = [0i8; 32];
                    for (dst, &src) in q.iter_mut().zip(&block[2..34]) {
                        *dst = src as i8;
                    }
                    qs.push(q);
                }
                Weights::Q8_0 { d, qs }
            }
            _ => return Ok(None),
        };
        Ok(Some(Self { weights, n, k }))
    }

    /// Several weights of the same input width and type as one, their outputs side by side
    /// (a layer's query, key and value projections, say: the input is quantized once and
    /// the threads are woken once). `None` when they differ in width or type.
    pub fn concat(parts: Vec<Self>) -> Option<Self> {
        let mut parts = parts.into_iter();
        let mut all = parts.next()?;
        for part in parts {
            if part.k != all.k {
                return None;
            }
            match (&mut all.weights, part.weights) {
                (
                    Weights::Q4_1 { d, m, qs },
                    Weights::Q4_1 {
                        d: d2,
                        m: m2,
                        qs: qs2,
                    },
                ) => {
                    d.extend(d2);
                    m.extend(m2);
                    qs.extend(qs2);
                }
                (Weights::Q8_0 { d, qs }, Weights::Q8_0 { d: d2, qs: qs2 }) => {
                    d.extend(d2);
                    qs.extend(qs2);
                }
                _ => return None,
            }
            all.n += part.n;
        }
        Some(all)
    }

    /// Output columns.
    pub fn columns_out(&self) -> usize {
        self.n
    }

    /// `x` (`[rows, k]`, f32) times the weight's transpose: `[rows, n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }
}

/// One row's activations quantized per block, as llama.cpp's AVX2 code does.
struct Quantized {
    qs: Vec<[i8; 32]>,
    /// Block scale (rounded through f16).
    d: Vec<f32>,
    /// Block scale times the sum of its levels (rounded through f16 once), for Q8_1.
    s: Vec<f32>,
}

fn quantize(x: &[f32]) -> Quantized {
    let blocks = x.len() / BLOCK;
    let mut out = Quantized {
        qs: Vec::with_capacity(blocks),
        d: Vec::with_capacity(blocks),
        s: Vec::with_capacity(blocks),
    };
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut q = [0i8; 32];
        let mut sum = 0i32;
        for (dst, &v) in q.iter_mut().zip(block) {
            // Ties to even, as `_mm256_round_ps` (|v * id| <= 127, far below 2^22).
            let level = ((v * id + 12_582_912.0) - 12_582_912.0) as i32;
            *dst = level as i8;
            sum += level;
        }
        out.qs.push(q);
        out.d.push(f16::from_f32(d).to_f32());
        out.s.push(f16::from_f32(d * sum as f32).to_f32());
    }
    out
}

#[inline(always)]
fn dot_q4(w: &[u8; 16], a: &[i8; 32]) -> i32 {
    let mut sum = 0i32;
    for j in 0..16 {
        sum += i32::from(w[j] & 0x0F) * i32::from(a[j]);
        sum += i32::from(w[j] >> 4) * i32::from(a[j + 16]);
    }
    sum
}

#[inline(always)]
fn dot_q8(w: &[i8; 32], a: &[i8; 32]) -> i32 {
    let mut sum = 0i32;
    for j in 0..32 {
        sum += i32::from(w[j]) * i32::from(a[j]);
    }
    sum
}

impl QuantMatmul {
    /// Products of columns `cols` with every row, written column-major into `out`
    /// (`out[c * rows + r]`).
    #[inline(always)]
    fn columns(&self, rows: &[Quantized], cols: std::ops::Range<usize>, out: &mut [f32]) {
        let nb = self.k / BLOCK;
        let count = rows.len();
        for (i, c) in cols.enumerate() {
            let dst = &mut out[i * count..(i + 1) * count];
            for (t, tile) in rows.chunks(TILE).enumerate() {
                let mut acc = [0f32; TILE];
                let mut mins = [0f32; TILE];
                for b in 0..nb {
                    let at = c * nb + b;
                    match &self.weights {
                        Weights::Q4_1 { d, m, qs } => {
                            let (dw, mw, w) = (d[at], m[at], &qs[at]);
                            for (r, row) in tile.iter().enumerate() {
                                let isum = dot_q4(w, &row.qs[b]);
                                acc[r] += dw * row.d[b] * isum as f32;
                                mins[r] += mw * row.s[b];
                            }
                        }
                        Weights::Q8_0 { d, qs } => {
                            let (dw, w) = (d[at], &qs[at]);
                            for (r, row) in tile.iter().enumerate() {
                                let isum = dot_q8(w, &row.qs[b]);
                                acc[r] += dw * row.d[b] * isum as f32;
                            }
                        }
                    }
                }
                for r in 0..tile.len() {
                    dst[t * TILE + r] = acc[r] + mins[r];
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn columns_avx2(&self, rows: &[Quantized], cols: std::ops::Range<usize>, out: &mut [f32]) {
        avx2::columns(self, rows, cols, out);
    }

    fn run_columns(&self, rows: &[Quantized], cols: std::ops::Range<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { self.columns_avx2(rows, cols, out) };
            return;
        }
        self.columns(rows, cols, out);
    }
}

/// The AVX2 kernel: llama.cpp's block dot products (`mul_sum_us8_pairs_float`,
/// `mul_sum_i8_pairs_float`, eight float lanes per row, summed at the end as `hsum_float_8`
/// does), for a tile of rows against one unpacked weight block at a time.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, QuantMatmul, Quantized, Weights};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let mut res = _mm256_extractf128_ps(x, 1);
        res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load(bytes: &[i8; 32]) -> __m256i {
        // SAFETY: 32 readable bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    /// One row's blocks, cut to exactly `nb` so that indexing needs no checks.
    struct Row<'a> {
        qs: &'a [[i8; 32]],
        d: &'a [f32],
        s: &'a [f32],
    }

    /// Q4_1: `R` rows against columns `c` and `c + 1` (or `c` alone when `PAIR` is false):
    /// each weight block is unpacked once for all rows, and each row's block is loaded
    /// once for both columns.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn q4_tile<const R: usize, const PAIR: bool>(
        d: &[f32],
        mw: &[f32],
        qs: &[[u8; 16]],
        nb: usize,
        c: usize,
        rows: &[Row<'_>; R],
    ) -> [[f32; R]; 2] {
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        let cols = if PAIR { 2 } else { 1 };
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let mut mins = [[0f32; R]; 2];
        let span = c * nb..(c + cols) * nb;
        let (d, mw, qs) = (&d[span.clone()], &mw[span.clone()], &qs[span]);
        for b in 0..nb {
            let mut w = [_mm256_setzero_si256(); 2];
            let mut scale = [0f32; 2];
            let mut min = [0f32; 2];
            for j in 0..cols {
                let at = j * nb + b;
                // SAFETY: 16 readable bytes; the load is unaligned.
                let packed = unsafe { _mm_loadu_si128(qs[at].as_ptr().cast()) };
                let lo = _mm_and_si128(packed, low);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                w[j] = _mm256_set_m128i(hi, lo);
                scale[j] = d[at];
                min[j] = mw[at];
            }
            for r in 0..R {
                let row = &rows[r];
                let a = load(&row.qs[b]);
                let (ad, asum) = (row.d[b], row.s[b]);
                for j in 0..cols {
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w[j], a), ones);
                    let sc = _mm256_set1_ps(scale[j] * ad);
                    acc[j][r] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(dot), acc[j][r]);
                    mins[j][r] += min[j] * asum;
                }
            }
        }
        let mut out = [[0f32; R]; 2];
        for j in 0..cols {
            for r in 0..R {
                out[j][r] = hsum(acc[j][r]) + mins[j][r];
            }
        }
        out
    }

    /// Q8_0: as [`q4_tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn q8_tile<const R: usize, const PAIR: bool>(
        d: &[f32],
        qs: &[[i8; 32]],
        nb: usize,
        c: usize,
        rows: &[Row<'_>; R],
    ) -> [[f32; R]; 2] {
        let ones = _mm256_set1_epi16(1);
        let cols = if PAIR { 2 } else { 1 };
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let span = c * nb..(c + cols) * nb;
        let (d, qs) = (&d[span.clone()], &qs[span]);
        for b in 0..nb {
            let mut w = [_mm256_setzero_si256(); 2];
            let mut w_abs = [_mm256_setzero_si256(); 2];
            let mut scale = [0f32; 2];
            for j in 0..cols {
                let at = j * nb + b;
                w[j] = load(&qs[at]);
                w_abs[j] = _mm256_sign_epi8(w[j], w[j]);
                scale[j] = d[at];
            }
            for r in 0..R {
                let row = &rows[r];
                let a = load(&row.qs[b]);
                let ad = row.d[b];
                for j in 0..cols {
                    let signed = _mm256_sign_epi8(a, w[j]);
                    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs[j], signed), ones);
                    let sc = _mm256_set1_ps(scale[j] * ad);
                    acc[j][r] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(dot), acc[j][r]);
                }
            }
        }
        let mut out = [[0f32; R]; 2];
        for j in 0..cols {
            for r in 0..R {
                out[j][r] = hsum(acc[j][r]);
            }
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tile<const R: usize>(
        m: &QuantMatmul,
        nb: usize,
        c: usize,
        pair: bool,
        rows: &[Row<'_>; R],
    ) -> [[f32; R]; 2] {
        match (&m.weights, pair) {
            (Weights::Q4_1 { d, m: mw, qs }, true) => q4_tile::<R, true>(d, mw, qs, nb, c, rows),
            (Weights::Q4_1 { d, m: mw, qs }, false) => q4_tile::<R, false>(d, mw, qs, nb, c, rows),
            (Weights::Q8_0 { d, qs }, true) => q8_tile::<R, true>(d, qs, nb, c, rows),
            (Weights::Q8_0 { d, qs }, false) => q8_tile::<R, false>(d, qs, nb, c, rows),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn columns(
        m: &QuantMatmul,
        rows: &[Quantized],
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let nb = m.k / BLOCK;
        let count = rows.len();
        let cut: Vec<Row<'_>> = rows
            .iter()
            .map(|r| Row {
                qs: &r.qs[..nb],
                d: &r.d[..nb],
                s: &r.s[..nb],
            })
            .collect();
        let first = cols.start;
        let mut c = cols.start;
        while c < cols.end {
            let pair = c + 1 < cols.end;
            let mut t = 0;
            while t < count {
                let left = count - t;
                macro_rules! run {
                    ($r:literal) => {{
                        let tile_rows: &[Row<'_>; $r] = match cut[t..t + $r].try_into() {
                            Ok(rows) => rows,
                            Err(_) => return,
                        };
                        let got = tile::<$r>(m, nb, c, pair, tile_rows);
                        for j in 0..(1 + usize::from(pair)) {
                            let at = (c + j - first) * count + t;
                            out[at..at + $r].copy_from_slice(&got[j]);
                        }
                        t += $r;
                    }};
                }
                match left {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
            }
            c += 1 + usize::from(pair);
        }
    }
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "wasp-quant-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: activations must be f32", self.name());
        };
        let dims = layout.shape().dims();
        let Some((&k, outer)) = dims.split_last() else {
            candle_core::bail!("{}: activations have no dimensions", self.name());
        };
        if k != self.k {
            candle_core::bail!(
                "{}: activations of width {k}, weight of width {}",
                self.name(),
                self.k
            );
        }
        let Some(x) = layout
            .contiguous_offsets()
            .map(|(start, end)| &data[start..end])
        else {
            candle_core::bail!("{}: activations must be contiguous", self.name());
        };
        // A prompt's rows are quantized and put back in row order on every thread: serial,
        // these two steps left the other cores waiting through much of a prefill. A
        // decoding step's few rows are faster on one.
        let parallel = x.len() >= PARALLEL_ROWS * k;
        let rows: Vec<Quantized> = if parallel {
            x.par_chunks_exact(k).map(quantize).collect()
        } else {
            x.chunks_exact(k).map(quantize).collect()
        };
        let count = rows.len();
        let n = self.n;
        let mut by_column = vec![0f32; n * count];
        by_column
            .par_chunks_mut(COLUMNS_PER_TASK * count.max(1))
            .enumerate()
            .for_each(|(task, out)| {
                let start = task * COLUMNS_PER_TASK;
                let end = (start + COLUMNS_PER_TASK).min(n);
                self.run_columns(&rows, start..end, out);
            });
        let result = if count == 1 {
            by_column
        } else if !parallel {
            let mut result = vec![0f32; count * n];
            for c in 0..n {
                for r in 0..count {
                    result[r * n + c] = by_column[c * count + r];
                }
            }
            result
        } else {
            let mut result = vec![0f32; count * n];
            result.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = by_column[c * count + r];
                }
            });
            result
        };
        let mut shape = outer.to_vec();
        shape.push(n);
        Ok((CpuStorage::F32(result), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use candle_core::Device;

    use super::*;

    #[test]
    fn products_match_dequantized_weights() {
        let device = Device::Cpu;
        let (n, k, rows) = (37, 64, 11);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
            .collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 104_729) % 97) as f32 / 40.0 - 1.2)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &device).unwrap();
        let x = Tensor::from_vec(x, (rows, k), &device).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let exact = x
                .matmul(&q.dequantize(&device).unwrap().t().unwrap())
                .unwrap();
            let ours = QuantMatmul::new(&q).unwrap().unwrap().forward(&x).unwrap();
            assert_eq!(ours.dims(), [rows, n]);
            let diff: f32 = (ours - &exact)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let scale: f32 = exact.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            // Only the activations' 8-bit rounding separates the two.
            assert!(diff < scale * 0.02, "{dtype:?}: {diff} of {scale}");
        }
    }

    /// The portable loop (CPUs without AVX2) and the AVX2 kernel give the same products.
    #[test]
    fn the_portable_and_avx2_paths_agree() {
        let device = Device::Cpu;
        let (n, k) = (9, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 31) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &device).unwrap();
        let rows: Vec<Quantized> = (0..6)
            .map(|r| {
                let x: Vec<f32> = (0..k)
                    .map(|i| ((i * 17 + r * 5) % 29) as f32 / 9.0 - 1.4)
                    .collect();
                quantize(&x)
            })
            .collect();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let m = QuantMatmul::new(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap();
            let mut portable = vec![0f32; n * rows.len()];
            m.columns(&rows, 0..n, &mut portable);
            let mut dispatched = vec![0f32; n * rows.len()];
            m.run_columns(&rows, 0..n, &mut dispatched);
            for (a, b) in portable.iter().zip(&dispatched) {
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "{dtype:?}: {a} {b}"
                );
            }
        }
    }

    #[test]
    fn activations_round_ties_to_even_like_llama_cpp() {
        // amax 127 makes the scale 1: 0.5 rounds to 0 and 1.5 to 2, as _mm256_round_ps
        // does (f32::round would give 1 and 2).
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = -2.5;
        let q = quantize(&x);
        assert_eq!(&q.qs[0][..4], &[127, 0, 2, -2]);
        assert_eq!(q.d[0], 1.0);
        assert_eq!(q.s[0], 127.0);
    }
}
