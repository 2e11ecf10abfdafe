//! CPU matmul of f32 activations by GGUF block-quantized weights (Q4_1, Q8_0): `y = x · Wᵀ`.
//!
//! Each call quantizes the activation rows as candle does (Q8_1 for Q4_1 weights, Q8_0 for
//! Q8_0 weights), then walks the weights in units of 8 rows, interleaved at load so that one
//! vector holds 4 elements of each of the 8 rows: a unit's blocks are read from memory once and
//! reused by every activation row (4 at a time from L1), and each block's 8 row sums land in
//! the 8 lanes of one vector, so the per-block float update is one vector step for 8 rows.
//! A 16-row step therefore costs far less than 16 one-row steps. Units are split over the
//! kernels' [`pool`]; [`matmul_many`] runs several matrices on one input in one quantization and
//! one pass.
//!
//! Every output is computed by one fixed sequence of operations, whatever the batch, the thread
//! count and the instruction set: exact integer block sums, then per block
//! `acc = fma(sumi, dx·dy, acc)` (Q4_1 also `acc = fma(mx, sy, acc)`, its minimum term). So a
//! row's result does not depend on which rows share a call, and the AVX2 and scalar kernels
//! agree bit for bit. Against candle's `QMatMul` (same quantization, the same integer sums,
//! unfused float updates in another order) results differ only by float rounding.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__m256;
use std::ops::Range;

use half::f16;

use crate::pool;

/// Elements per quantization block (all formats here).
pub const BLOCK: usize = 32;
/// Weight rows per unit of work; weights are interleaved in units of this many rows.
const UNIT_ROWS: usize = 8;
/// Activation rows computed together against one weight unit, at most: their block sums and
/// accumulators fill the vector registers.
const ACT_TILE: usize = 4;
/// Fewest activation values per parallel quantization task (about 2 µs of work, against ~1.5
/// µs for a fork): a 16-row decode batch splits over two threads, a single row does not.
const PAR_QUANTIZE_MIN: usize = 1 << 12;

/// The GGUF block formats [`QuantMatrix`] multiplies natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 unsigned 4-bit values, f16 scale `d` and f16 minimum `m`: `x = q·d + m`.
    Q4_1,
    /// 32 signed 8-bit values and an f16 scale: `x = q·d`.
    Q8_0,
}

impl BlockFormat {
    /// Bytes one 32-element block takes in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantMatmulError {
    #[error("{cols} columns is not a positive multiple of the block size {BLOCK}")]
    Columns { cols: usize },
    #[error("{format:?} weights of {rows}x{cols} take {expected} bytes, got {actual}")]
    WeightBytes {
        format: BlockFormat,
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error("input of {len} values is not a whole number of {cols}-wide rows")]
    Input { len: usize, cols: usize },
    #[error("output has {actual} values, expected {expected}")]
    Output { actual: usize, expected: usize },
    #[error("matrices of {first} and {other} columns cannot share an input")]
    ColumnsDiffer { first: usize, other: usize },
    #[error("{matrices} matrices but {outputs} outputs")]
    Outputs { matrices: usize, outputs: usize },
}

/// One block of 8 weight rows of Q4_1, interleaved for the AVX2 kernel: `qs[32t + 4j + e]` is
/// byte `4t + e` of row `j`'s GGUF block, so its low nibble is element `4t + e` and its high
/// nibble element `16 + 4t + e`. Scales and minimums are widened to f32 once, at load.
#[derive(Clone)]
#[repr(C, align(32))]
struct Q41x8 {
    qs: [u8; 128],
    d: [f32; UNIT_ROWS],
    m: [f32; UNIT_ROWS],
}

/// One block of 8 weight rows of Q8_0, interleaved like [`Q41x8`]: `qs[32t + 4j + e]` is
/// element `4t + e` of row `j`.
#[derive(Clone)]
#[repr(C, align(32))]
struct Q80x8 {
    qs: [i8; 256],
    d: [f32; UNIT_ROWS],
}

/// Weights as `[units][blocks per row]`; rows past `rows` in the last unit are zero.
enum Packed {
    Q4_1(Vec<Q41x8>),
    Q8_0(Vec<Q80x8>),
}

/// A `[rows, cols]` weight matrix in one of the [`BlockFormat`]s, ready for [`Self::matmul`].
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    packed: Packed,
    /// AVX2+FMA kernels (detected at load); the scalar ones otherwise.
    simd: bool,
}

/// Activation rows quantized to 8 bits per element, `[rows][blocks per row]`.
struct QuantRows {
    qs: Vec<[i8; BLOCK]>,
    /// Block scales, f16-rounded as candle stores them, widened to f32.
    d: Vec<f32>,
    /// `d · Σq` per block (f16-rounded), Q8_1's extra field.
    s: Vec<f32>,
    blocks: usize,
}

fn f16_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl QuantMatrix {
    /// Takes `rows × cols` weights in `format` as the GGUF file stores them (row-major, each
    /// row `cols / 32` blocks).
    pub fn from_gguf_blocks(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<Self, QuantMatmulError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(QuantMatmulError::Columns { cols });
        }
        let nb = cols / BLOCK;
        let bb = format.block_bytes();
        let expected = rows * nb * bb;
        if data.len() != expected {
            return Err(QuantMatmulError::WeightBytes {
                format,
                rows,
                cols,
                expected,
                actual: data.len(),
            });
        }
        let block = |row: usize, b: usize| &data[(row * nb + b) * bb..(row * nb + b + 1) * bb];
        // Calls `fill(packed index, block bytes, row in unit)` for each valid row of each unit's
        // blocks; the packed index of unit `u`'s block `b` is `u * nb + b`.
        let pack = |fill: &mut dyn FnMut(usize, &[u8], usize)| {
            for u in 0..rows.div_ceil(UNIT_ROWS) {
                for b in 0..nb {
                    for j in 0..UNIT_ROWS.min(rows - u * UNIT_ROWS) {
                        fill(u * nb + b, block(u * UNIT_ROWS + j, b), j);
                    }
                }
            }
        };
        let units = rows.div_ceil(UNIT_ROWS) * nb;
        let packed = match format {
            BlockFormat::Q4_1 => {
                let empty = Q41x8 {
                    qs: [0; 128],
                    d: [0.0; UNIT_ROWS],
                    m: [0.0; UNIT_ROWS],
                };
                let mut packed = vec![empty; units];
                pack(&mut |i, src, j| {
                    let p = &mut packed[i];
                    p.d[j] = f16_at(src, 0).to_f32();
                    p.m[j] = f16_at(src, 2).to_f32();
                    for t in 0..4 {
                        p.qs[32 * t + 4 * j..][..4].copy_from_slice(&src[4 + 4 * t..][..4]);
                    }
                });
                Packed::Q4_1(packed)
            }
            BlockFormat::Q8_0 => {
                let empty = Q80x8 {
                    qs: [0; 256],
                    d: [0.0; UNIT_ROWS],
                };
                let mut packed = vec![empty; units];
                pack(&mut |i, src, j| {
                    let p = &mut packed[i];
                    p.d[j] = f16_at(src, 0).to_f32();
                    for t in 0..8 {
                        for e in 0..4 {
                            p.qs[32 * t + 4 * j + e] = src[2 + 4 * t + e] as i8;
                        }
                    }
                });
                Packed::Q8_0(packed)
            }
        };
        Ok(Self {
            rows,
            cols,
            packed,
            simd: has_avx2_fma(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> BlockFormat {
        match self.packed {
            Packed::Q4_1(_) => BlockFormat::Q4_1,
            Packed::Q8_0(_) => BlockFormat::Q8_0,
        }
    }

    /// `out[r][j] = Σ_k x[r][k] · W[j][k]` for the `x.len() / cols` rows of `x` (`[m, cols]`
    /// row-major; `out` is `[m, rows]`). Row `r`'s result depends on row `r` only.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) -> Result<(), QuantMatmulError> {
        matmul_many(&[self], x, &mut [out])
    }

    /// Weight rows `8·unit ..` (the valid ones) against every row `a` of `acts`, into
    /// `out[a][j - first]` (`out[a]` covers this task's rows from `first`).
    fn unit_rows(&self, unit: usize, acts: &QuantRows, first: usize, out: &mut [&mut [f32]]) {
        let nb = acts.blocks;
        let blocks = unit * nb..(unit + 1) * nb;
        let row0 = unit * UNIT_ROWS;
        let cols = row0 - first..row0 - first + UNIT_ROWS.min(self.rows - row0);
        match &self.packed {
            Packed::Q4_1(packed) => unit_all_rows(&packed[blocks], self.simd, acts, out, cols),
            Packed::Q8_0(packed) => unit_all_rows(&packed[blocks], self.simd, acts, out, cols),
        }
    }
}

/// A packed block of 8 weight rows: its elements for the scalar kernel, and its AVX2 kernel.
trait UnitBlock: Sized {
    /// Element `i` (0..32) of row `j`, the integer the kernels multiply.
    fn quant(&self, j: usize, i: usize) -> i32;
    /// Row `j`'s scale.
    fn scale(&self, j: usize) -> f32;
    /// Row `j`'s minimum, for formats that have one (Q4_1's `m`).
    fn min(&self, j: usize) -> Option<f32>;

    /// The unit's 8 rows (blocks `w`) against activation rows `a0 .. a0 + A` (`A` at most
    /// [`ACT_TILE`]): one vector of the 8 rows' results per activation row.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_tile<const A: usize>(w: &[Self], acts: &QuantRows, a0: usize) -> [__m256; A];
}

impl UnitBlock for Q41x8 {
    fn quant(&self, j: usize, i: usize) -> i32 {
        let (half, i) = (i / 16, i % 16);
        let byte = self.qs[32 * (i / 4) + 4 * j + i % 4];
        i32::from(if half == 0 { byte & 0x0F } else { byte >> 4 })
    }
    fn scale(&self, j: usize) -> f32 {
        self.d[j]
    }
    fn min(&self, j: usize) -> Option<f32> {
        Some(self.m[j])
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2_tile<const A: usize>(w: &[Self], acts: &QuantRows, a0: usize) -> [__m256; A] {
        avx2::q4_1_unit::<A>(w, acts, a0)
    }
}

impl UnitBlock for Q80x8 {
    fn quant(&self, j: usize, i: usize) -> i32 {
        self.qs[32 * (i / 4) + 4 * j + i % 4] as i32
    }
    fn scale(&self, j: usize) -> f32 {
        self.d[j]
    }
    fn min(&self, _: usize) -> Option<f32> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2_tile<const A: usize>(w: &[Self], acts: &QuantRows, a0: usize) -> [__m256; A] {
        avx2::q8_0_unit::<A>(w, acts, a0)
    }
}

/// Row `j` of the unit whose blocks are `w` against the activation row starting at block
/// `row`, in the kernels' order (see the module doc): the machines without AVX2, and the
/// reference the AVX2 kernels are tested against.
fn scalar_row<U: UnitBlock>(w: &[U], j: usize, acts: &QuantRows, row: usize) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.iter().enumerate() {
        let y = &acts.qs[row + b];
        let sumi: i32 = (0..BLOCK).map(|i| blk.quant(j, i) * y[i] as i32).sum();
        acc = (sumi as f32).mul_add(blk.scale(j) * acts.d[row + b], acc);
        if let Some(m) = blk.min(j) {
            acc = m.mul_add(acts.s[row + b], acc);
        }
    }
    acc
}

/// One unit (blocks `w`) against every activation row: the unit's row `j` into
/// `out[a][cols.start + j]` for its valid rows (`cols`), by the AVX2 kernels where `simd`, else
/// the scalar one.
fn unit_all_rows<U: UnitBlock>(
    w: &[U],
    simd: bool,
    acts: &QuantRows,
    out: &mut [&mut [f32]],
    cols: Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only where AVX2 and FMA were detected.
        unsafe { avx2::unit_all_rows(w, acts, out, cols) };
        return;
    }
    let _ = simd;
    for (a, out) in out.iter_mut().enumerate() {
        for (j, out) in out[cols.clone()].iter_mut().enumerate() {
            *out = scalar_row(w, j, acts, a * acts.blocks);
        }
    }
}

/// [`QuantMatrix::matmul`] of several matrices with the same column count on one `x`
/// (`outs[i]` is `[m, mats[i].rows()]`): `x` is quantized once and all matrices' rows are
/// split over one parallel pass, which for small batches costs much less than one pass each.
pub fn matmul_many(
    mats: &[&QuantMatrix],
    x: &[f32],
    outs: &mut [&mut [f32]],
) -> Result<(), QuantMatmulError> {
    let Some(k) = mats.first().map(|w| w.cols) else {
        return Ok(());
    };
    if let Some(w) = mats.iter().find(|w| w.cols != k) {
        return Err(QuantMatmulError::ColumnsDiffer {
            first: k,
            other: w.cols,
        });
    }
    if !x.len().is_multiple_of(k) {
        return Err(QuantMatmulError::Input {
            len: x.len(),
            cols: k,
        });
    }
    let m = x.len() / k;
    if outs.len() != mats.len() {
        return Err(QuantMatmulError::Outputs {
            matrices: mats.len(),
            outputs: outs.len(),
        });
    }
    for (w, out) in mats.iter().zip(outs.iter()) {
        if out.len() != m * w.rows {
            return Err(QuantMatmulError::Output {
                actual: out.len(),
                expected: m * w.rows,
            });
        }
    }
    if m == 0 {
        return Ok(());
    }
    let acts = quantize_rows(x, k, mats.iter().all(|w| w.simd));
    // Tasks are runs of whole units of one matrix, a few per thread so uneven ones balance out.
    let units: usize = mats.iter().map(|w| w.rows.div_ceil(UNIT_ROWS)).sum();
    let span = pool::task_len(units, 1, 1) * UNIT_ROWS;
    // (matrix, first row, that row range of every output row).
    let mut work: Vec<(&QuantMatrix, usize, Vec<&mut [f32]>)> = Vec::new();
    for (w, out) in mats.iter().zip(outs.iter_mut()) {
        let first_task = work.len();
        for start in (0..w.rows).step_by(span) {
            work.push((w, start, Vec::with_capacity(m)));
        }
        if w.rows == 0 {
            continue;
        }
        for row in out.chunks_exact_mut(w.rows) {
            for (i, piece) in row.chunks_mut(span).enumerate() {
                work[first_task + i].2.push(piece);
            }
        }
    }
    pool::for_each_mut(&mut work, |(w, first, out)| {
        let end = (*first + span).min(w.rows);
        for unit in *first / UNIT_ROWS..end.div_ceil(UNIT_ROWS) {
            w.unit_rows(unit, &acts, *first, out);
        }
    });
    Ok(())
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Quantizes each `k`-wide row of `x` as candle's `quantize_row_q8_1` does, rows in parallel
/// (AVX2 where `simd`, same results). Q8_0 (`quantize_row_q8_0`) is the same without the block
/// sums, which its kernels ignore.
fn quantize_rows(x: &[f32], k: usize, simd: bool) -> QuantRows {
    let nb = k / BLOCK;
    let total = x.len() / BLOCK;
    let mut q = QuantRows {
        qs: vec![[0; BLOCK]; total],
        d: vec![0.0; total],
        s: vec![0.0; total],
        blocks: nb,
    };
    let mut rows: Vec<_> = x
        .chunks_exact(k)
        .zip(q.qs.chunks_mut(nb))
        .zip(q.d.chunks_mut(nb))
        .zip(q.s.chunks_mut(nb))
        .collect();
    let per_task = pool::task_len(rows.len(), PAR_QUANTIZE_MIN.div_ceil(k), 1);
    let mut tasks: Vec<_> = rows.chunks_mut(per_task).collect();
    pool::for_each_mut(&mut tasks, |rows| {
        for (((x, qs), d), s) in rows.iter_mut() {
            for (b, (xs, qs)) in x.chunks_exact(BLOCK).zip(qs.iter_mut()).enumerate() {
                let (scale, sum) = quantize_block(xs, qs, simd);
                let scale16 = f16::from_f32(scale);
                d[b] = scale16.to_f32();
                // f16 × f16 as candle computes it (through f32, rounded back to f16).
                s[b] = (f16::from_f32(sum as f32) * scale16).to_f32();
            }
        }
    });
    q
}

/// One block of candle's Q8 quantization: `qs[i] = round(xs[i] / scale)` with
/// `scale = max|xs| / 127`; returns `scale` (before f16 rounding) and `Σ qs`.
fn quantize_block(xs: &[f32], qs: &mut [i8; BLOCK], simd: bool) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only where AVX2 and FMA were detected.
        return unsafe { avx2::quantize_block(xs, qs) };
    }
    let _ = simd;
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xs) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (scale, sum)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use std::ops::Range;

    use super::{Q41x8, Q80x8, QuantRows, UnitBlock, ACT_TILE, BLOCK, UNIT_ROWS};

    /// [`super::unit_all_rows`]: full tiles of [`ACT_TILE`] activation rows, then the rest
    /// in one smaller tile, each kernel's vectors stored straight into the output rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn unit_all_rows<U: UnitBlock>(
        w: &[U],
        acts: &QuantRows,
        out: &mut [&mut [f32]],
        cols: Range<usize>,
    ) {
        let mut tiles = out.chunks_exact_mut(ACT_TILE);
        let mut a0 = 0;
        for tile in &mut tiles {
            put(U::avx2_tile::<ACT_TILE>(w, acts, a0), tile, &cols);
            a0 += ACT_TILE;
        }
        let rest = tiles.into_remainder();
        match rest.len() {
            1 => put(U::avx2_tile::<1>(w, acts, a0), rest, &cols),
            2 => put(U::avx2_tile::<2>(w, acts, a0), rest, &cols),
            3 => put(U::avx2_tile::<3>(w, acts, a0), rest, &cols),
            _ => {}
        }
    }

    /// Activation row `a`'s 8 results into `cols` of `out[a]` (fewer where the unit has
    /// fewer valid rows).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn put<const A: usize>(res: [__m256; A], out: &mut [&mut [f32]], cols: &Range<usize>) {
        for (v, out) in res.into_iter().zip(out) {
            let dst = &mut out[cols.clone()];
            if dst.len() == UNIT_ROWS {
                _mm256_storeu_ps(dst.as_mut_ptr(), v);
            } else {
                let mut all = [0f32; UNIT_ROWS];
                _mm256_storeu_ps(all.as_mut_ptr(), v);
                dst.copy_from_slice(&all[..dst.len()]);
            }
        }
    }

    /// Bytes `at..at + 4` of an activation block, in every 32-bit lane.
    #[inline(always)]
    unsafe fn broadcast4(q: &[i8; BLOCK], at: usize) -> __m256i {
        _mm256_set1_epi32(i32::from_le_bytes([
            q[at] as u8,
            q[at + 1] as u8,
            q[at + 2] as u8,
            q[at + 3] as u8,
        ]))
    }

    /// Pointers to block `0` of activation rows `a0 .. a0 + A`: quants, scales, sums.
    #[inline(always)]
    fn act_rows<const A: usize>(
        acts: &QuantRows,
        a0: usize,
    ) -> ([*const [i8; BLOCK]; A], [*const f32; A], [*const f32; A]) {
        let nb = acts.blocks;
        assert!((a0 + A) * nb <= acts.qs.len());
        let at = |a: usize| (a0 + a) * nb;
        (
            std::array::from_fn(|a| acts.qs[at(a)..].as_ptr()),
            std::array::from_fn(|a| acts.d[at(a)..].as_ptr()),
            std::array::from_fn(|a| acts.s[at(a)..].as_ptr()),
        )
    }

    /// 8 Q4_1 rows × `A` activation rows. Per block, lane `j` of `isum` gathers row `j`'s
    /// products 4 elements at a time (u8 × i8 pairs in i16: at most 8 · 2 · 15 · 127 = 30480,
    /// no overflow), giving the exact integer block sum; the float update is lane-wise.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn q4_1_unit<const A: usize>(
        w: &[Q41x8],
        acts: &QuantRows,
        a0: usize,
    ) -> [__m256; A] {
        let (ys, yd, ysum) = act_rows::<A>(acts, a0);
        assert_eq!(w.len(), acts.blocks);
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); A];
        for (b, blk) in w.iter().enumerate() {
            let mut isum = [_mm256_setzero_si256(); A];
            for t in 0..4 {
                let p = _mm256_load_si256(blk.qs.as_ptr().add(32 * t) as *const __m256i);
                let lo = _mm256_and_si256(p, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(p), mask);
                for (s, y) in isum.iter_mut().zip(ys) {
                    // SAFETY: `b` < blocks per row, checked by `act_rows`.
                    let y = &*y.add(b);
                    let s_lo = _mm256_maddubs_epi16(lo, broadcast4(y, 4 * t));
                    let s_hi = _mm256_maddubs_epi16(hi, broadcast4(y, 16 + 4 * t));
                    *s = _mm256_add_epi16(*s, _mm256_add_epi16(s_lo, s_hi));
                }
            }
            let dx = _mm256_load_ps(blk.d.as_ptr());
            let mx = _mm256_load_ps(blk.m.as_ptr());
            for a in 0..A {
                let sumi = _mm256_cvtepi32_ps(_mm256_madd_epi16(isum[a], ones));
                let d = _mm256_mul_ps(dx, _mm256_broadcast_ss(&*yd[a].add(b)));
                acc[a] = _mm256_fmadd_ps(sumi, d, acc[a]);
                acc[a] = _mm256_fmadd_ps(mx, _mm256_broadcast_ss(&*ysum[a].add(b)), acc[a]);
            }
        }
        acc
    }

    /// 8 Q8_0 rows × `A` activation rows. `maddubs` needs an unsigned operand, so each
    /// product is taken as `|w| · (y · sign w)` (exact; pairs stay within i16: at most
    /// 2 · 128 · 127); lane `j` of `isum` gathers row `j`'s exact integer block sum.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn q8_0_unit<const A: usize>(
        w: &[Q80x8],
        acts: &QuantRows,
        a0: usize,
    ) -> [__m256; A] {
        let (ys, yd, _) = act_rows::<A>(acts, a0);
        assert_eq!(w.len(), acts.blocks);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); A];
        for (b, blk) in w.iter().enumerate() {
            let mut isum = [_mm256_setzero_si256(); A];
            for t in 0..8 {
                let wv = _mm256_load_si256(blk.qs.as_ptr().add(32 * t) as *const __m256i);
                let abs = _mm256_sign_epi8(wv, wv);
                for (s, y) in isum.iter_mut().zip(ys) {
                    // SAFETY: `b` < blocks per row, checked by `act_rows`.
                    let y = _mm256_sign_epi8(broadcast4(&*y.add(b), 4 * t), wv);
                    let pairs = _mm256_maddubs_epi16(abs, y);
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(pairs, ones));
                }
            }
            let dx = _mm256_load_ps(blk.d.as_ptr());
            for a in 0..A {
                let d = _mm256_mul_ps(dx, _mm256_broadcast_ss(&*yd[a].add(b)));
                acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[a]), d, acc[a]);
            }
        }
        acc
    }

    /// [`super::quantize_block`]: the same max, division and products, and the same
    /// round-half-away-from-zero (truncate, then step away where the dropped part is >= 0.5,
    /// both exact in f32), so the same quants.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block(xs: &[f32], qs: &mut [i8; BLOCK]) -> (f32, i32) {
        assert_eq!(xs.len(), BLOCK);
        let p = xs.as_ptr();
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let (half, one, sign) = (
            _mm256_set1_ps(0.5),
            _mm256_set1_ps(1.0),
            _mm256_set1_ps(-0.0),
        );
        let mut q = [_mm256_setzero_si256(); 4];
        for (q, v) in q.iter_mut().zip(v) {
            let t = _mm256_mul_ps(v, inv);
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(_mm256_sub_ps(t, r), abs), half);
            let step = _mm256_and_ps(away, _mm256_or_ps(_mm256_and_ps(t, sign), one));
            *q = _mm256_cvttps_epi32(_mm256_add_ps(r, step));
        }
        // Saturating packs (as `as i8` saturates) interleave the four vectors' halves;
        // the permutation puts the 4-byte groups back in element order.
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered);
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        (scale, _mm_cvtsi128_si32(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use rand::{Rng, SeedableRng};

    /// `len` values of mixed magnitude, with some all-zero 32-blocks (the zero-scale path).
    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v: Vec<f32> = (0..len)
            .map(|_| (rng.random::<f32>() - 0.5) * 10f32.powi(rng.random_range(-2..2)))
            .collect();
        for block in v.chunks_mut(BLOCK).step_by(7) {
            block.fill(0.0);
        }
        v
    }

    /// Candle's quantization of random `[n, k]` weights, and ours built from its GGUF bytes.
    fn weights(format: BlockFormat, n: usize, k: usize, seed: u64) -> (QTensor, QuantMatrix) {
        let dtype = match format {
            BlockFormat::Q4_1 => GgmlDType::Q4_1,
            BlockFormat::Q8_0 => GgmlDType::Q8_0,
        };
        let w = Tensor::from_vec(random(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantMatrix::from_gguf_blocks(format, n, k, &q.data().unwrap()).unwrap();
        (q, ours)
    }

    fn ours(w: &QuantMatrix, x: &[f32]) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.len() / w.cols() * w.rows()];
        w.matmul(x, &mut out).unwrap();
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Matches candle's `QMatMul::forward` (the quantized, not dequantized, variant: same
    /// activation quantization and integer block sums) up to float rounding of the per-block
    /// updates, for decode-like and prefill-like row counts, and row counts that are not a
    /// multiple of the activation tile nor weight rows of the 8-row unit. (k is kept off
    /// multiples of 256, where candle on VNNI machines repacks Q8_0 with other rounding, and at
    /// an even number of blocks, which candle debug-asserts for Q4_1.)
    #[test]
    fn matches_candle_qmatmul() {
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            for (n, k, m) in [
                (64, 576, 1),
                (37, 128, 5),
                (200, 192, 16),
                (8, 64, 3),
                (3, 64, 33),
            ] {
                let (q, w) = weights(format, n, k, (n * k) as u64);
                let x = random(m * k, m as u64);
                let theirs = QMatMul::QTensor(std::sync::Arc::new(q))
                    .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let ours = ours(&w, &x);
                let scale = theirs.iter().fold(1f32, |a, v| a.max(v.abs()));
                for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale,
                        "{format:?} n={n} k={k} m={m} [{i}]: {a} vs candle {b}"
                    );
                }
            }
        }
    }

    /// The scalar kernels (machines without AVX2) compute what the AVX2 ones do, bit for bit.
    #[test]
    fn scalar_kernels_equal_simd_kernels() {
        let (n, k, m) = (21, 128, 6);
        let x = random(m * k, 5);
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (_, mut w) = weights(format, n, k, 11);
            let simd = ours(&w, &x);
            w.simd = false;
            let scalar = ours(&w, &x);
            assert_eq!(bits(&scalar), bits(&simd), "{format:?}");
        }
    }

    /// The AVX2 block quantizer gives the scalar one's (candle's) quants, scale and sum, ties
    /// included: with `max = 127` the scale is 1 and every `x.5` must round away from zero.
    #[test]
    fn simd_quantization_equals_scalar() {
        let mut ties = [0f32; BLOCK];
        ties[0] = 127.0;
        for (i, v) in ties.iter_mut().enumerate().skip(1) {
            let mag = (i as f32 - 1.0) * 4.0 + 0.5;
            *v = if i % 2 == 0 { mag } else { -mag };
        }
        ties[5] = 0.499_999_97;
        ties[6] = -0.499_999_97;
        ties[7] = -0.0;
        let mut blocks = vec![ties, [0.0; BLOCK], [-3.0; BLOCK]];
        blocks.extend(random(64 * BLOCK, 8).chunks(BLOCK).map(|c| {
            let mut b = [0f32; BLOCK];
            b.copy_from_slice(c);
            b
        }));
        for xs in &blocks {
            let (mut scalar, mut simd) = ([0i8; BLOCK], [0i8; BLOCK]);
            let a = quantize_block(xs, &mut scalar, false);
            let b = quantize_block(xs, &mut simd, has_avx2_fma());
            assert_eq!(
                (a.0.to_bits(), a.1, scalar),
                (b.0.to_bits(), b.1, simd),
                "{xs:?}"
            );
        }
        let mut q = [0i8; BLOCK];
        quantize_block(&ties, &mut q, false);
        assert_eq!(&q[..9], &[127, -1, 5, -9, 13, 0, 0, 0, 29]);
    }

    /// Row `r` of a 16-row call equals a 1-row call on row `r` alone, on the pool or on one
    /// thread.
    #[test]
    fn rows_are_independent_of_batch_and_threads() {
        let (n, k, m) = (45, 192, 16);
        let x = random(m * k, 9);
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (_, w) = weights(format, n, k, 3);
            let batched = ours(&w, &x);
            assert_eq!(bits(&batched), bits(&pool::serially(|| ours(&w, &x))));
            for r in 0..m {
                let alone = ours(&w, &x[r * k..(r + 1) * k]);
                assert_eq!(
                    bits(&alone),
                    bits(&batched[r * n..(r + 1) * n]),
                    "{format:?} row {r}"
                );
            }
            let odd = [3, 7, 11];
            let picked: Vec<f32> = odd
                .iter()
                .flat_map(|&r| x[r * k..(r + 1) * k].to_vec())
                .collect();
            let picked_out = ours(&w, &picked);
            for (i, &r) in odd.iter().enumerate() {
                assert_eq!(
                    bits(&picked_out[i * n..(i + 1) * n]),
                    bits(&batched[r * n..(r + 1) * n])
                );
            }
        }
    }

    /// The quantized product stays near the f32 product of the dequantized weights (a check
    /// on the maths, independent of candle).
    #[test]
    fn close_to_f32_matmul_of_dequantized_weights() {
        let (n, k, m) = (13, 256, 2);
        let x = random(m * k, 21);
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (q, w) = weights(format, n, k, 4);
            let deq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let out = ours(&w, &x);
            for r in 0..m {
                for j in 0..n {
                    let xr = &x[r * k..(r + 1) * k];
                    let exact: f32 = xr
                        .iter()
                        .zip(&deq[j * k..(j + 1) * k])
                        .map(|(a, b)| a * b)
                        .sum();
                    let scale: f32 = xr
                        .iter()
                        .zip(&deq[j * k..(j + 1) * k])
                        .map(|(a, b)| (a * b).abs())
                        .sum();
                    let got = out[r * n + j];
                    assert!(
                        (got - exact).abs() <= 0.02 * scale + 1e-6,
                        "{format:?} {got} vs {exact}"
                    );
                }
            }
        }
    }

    /// Several matrices (mixed formats, one with fewer rows than a unit) on one input give
    /// exactly what separate calls give.
    #[test]
    fn matmul_many_equals_separate_calls() {
        let (k, m) = (128, 6);
        let x = random(m * k, 17);
        let mats = [
            weights(BlockFormat::Q4_1, 40, k, 1).1,
            weights(BlockFormat::Q8_0, 3, k, 2).1,
            weights(BlockFormat::Q4_1, 17, k, 3).1,
        ];
        let refs: Vec<&QuantMatrix> = mats.iter().collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![f32::NAN; m * w.rows()]).collect();
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        matmul_many(&refs, &x, &mut slices).unwrap();
        for (w, out) in mats.iter().zip(&outs) {
            assert_eq!(bits(out), bits(&ours(w, &x)));
        }
        let narrow = weights(BlockFormat::Q4_1, 8, 64, 4).1;
        assert_eq!(
            matmul_many(&[&mats[0], &narrow], &x, &mut [&mut [], &mut []]),
            Err(QuantMatmulError::ColumnsDiffer {
                first: 128,
                other: 64
            })
        );
        assert_eq!(
            matmul_many(&[&mats[0]], &x, &mut []),
            Err(QuantMatmulError::Outputs {
                matrices: 1,
                outputs: 0
            })
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        let e = QuantMatrix::from_gguf_blocks(BlockFormat::Q4_1, 2, 48, &[0; 80]);
        assert_eq!(e.err(), Some(QuantMatmulError::Columns { cols: 48 }));
        let e = QuantMatrix::from_gguf_blocks(BlockFormat::Q8_0, 2, 64, &[0; 130]);
        assert!(matches!(
            e,
            Err(QuantMatmulError::WeightBytes {
                expected: 136,
                actual: 130,
                ..
            })
        ));
        let w = QuantMatrix::from_gguf_blocks(BlockFormat::Q4_1, 2, 64, &[0; 80]).unwrap();
        let mut out = vec![0.0; 4];
        assert_eq!(
            w.matmul(&[0.0; 65], &mut out),
            Err(QuantMatmulError::Input { len: 65, cols: 64 })
        );
        assert_eq!(
            w.matmul(&[0.0; 128], &mut out[..3]),
            Err(QuantMatmulError::Output {
                actual: 3,
                expected: 4
            })
        );
        assert_eq!(w.matmul(&[0.0; 128], &mut out), Ok(()));
    }
}
