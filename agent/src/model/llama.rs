//! The llama-family decoder (llama, qwen2) and its batched forward pass over the paged KV cache.
//!
//! One call runs one engine step: the tokens of every scheduled sequence are flattened into
//! rows of one `[T, hidden]` batch. Projections and the MLP run on the whole batch: Q4_1 and
//! Q8_0 weights through the kernels' [`QuantMatrix`] (each weight block read once per step for
//! all rows; each row quantized on its own, so a row's result does not depend on its
//! batch-mates; equal to candle's `QMatMul` up to float rounding), other weights through
//! candle. Attention goes through the kernels' `PagedAttention` with per-sequence block
//! tables. The arithmetic is that of candle-transformers' `quantized_llama`, so greedy tokens
//! match that reference (up to near-ties on quantized weights).
//!
//! The pass runs on plain f32 buffers ([`Activations`]) that every layer reuses, and writes
//! the logits into the caller's [`Logits`]: a step neither allocates nor zeroes per layer (the
//! candle-tensor version zeroed ~15 MB per 16-row step, ~4% of the engine thread). candle
//! tensors remain for loading and for the weights the kernels do not take.
//!
//! Threads: a step with a few rows per thread or more runs as one group of rows per thread,
//! each group's layer stages on one thread (see [`LlamaModel::forward`]); a smaller step
//! spreads each kernel loop over the threads. The kernels run on the kernels' spinning
//! [`pool`]. candle's CPU backend has a pool of its own (rayon) that it uses for quantized
//! matmuls and for elementwise, norm and rotary ops on larger inputs; sharing the cores with
//! it halved throughput, so none of those ops run here: RMSNorm, RoPE, the residual adds and
//! the SwiGLU product are loops of this module with candle's formulas (the SwiGLU `exp` is a
//! vector one, which may differ from libm's in the last bit).

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Storage, Tensor};
use kernels::{pool, BlockFormat, CpuKvCache, KvLayout, QuantMatrix, SeqAttn};
use wide::f32x8;

use super::{ModelConfig, ModelError};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF llama (llama.cpp permutes the Q/K weights for it).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints, and qwen2 in any format.
    Neox,
}

/// One engine step's input. Row `r` is token `token_ids[r]` at `positions[r]` of its sequence,
/// whose K/V go to cache slot `slots[r]`.
pub struct StepInput<'a> {
    pub token_ids: &'a [u32],
    pub positions: &'a [usize],
    pub slots: &'a [usize],
    pub seqs: &'a [SeqAttn<'a>],
    /// Rows whose logits to return, in this order.
    pub logits_rows: &'a [usize],
    /// Rows whose final hidden states (after the last norm) to return, in this order: what
    /// embeddings pool.
    pub hidden_rows: &'a [usize],
}

/// The logits of one step's `logits_rows`, `[rows, vocab]`, and the final hidden states of its
/// `hidden_rows`, `[rows, hidden]`. Its owner keeps it across steps, so the buffer (16 rows of a
/// 49,152-token vocabulary: 3 MB) is allocated and zeroed once.
#[derive(Debug, Default)]
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
    hidden: Vec<f32>,
    hidden_size: usize,
}

impl Logits {
    /// The final hidden state of `hidden_rows[i]`.
    pub fn hidden_row(&self, i: usize) -> &[f32] {
        &self.hidden[i * self.hidden_size..][..self.hidden_size]
    }

    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..][..self.vocab]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.vocab..][..self.vocab]
    }

    /// The rows in order.
    pub fn iter(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.vocab.max(1))
    }
}

/// A `[out, in]` weight matrix as the forward pass runs it: the kernels' [`QuantMatrix`] for
/// the block formats it supports, candle's `QMatMul` for anything else (f32 weights of
/// Hugging Face checkpoints and of `CANDLE_DEQUANTIZE_ALL=1`, other GGUF formats).
pub(crate) enum Matmul {
    Kernel(QuantMatrix),
    Candle {
        weight: QMatMul,
        rows: usize,
        cols: usize,
    },
}

impl Matmul {
    fn new(weight: QMatMul) -> Result<Self, ModelError> {
        let (rows, cols) = match &weight {
            QMatMul::QTensor(q) => q.shape().dims2()?,
            QMatMul::Tensor(w) | QMatMul::TensorF16(w) => w.dims2()?,
        };
        let format = match &weight {
            QMatMul::QTensor(q) => match q.dtype() {
                GgmlDType::Q4_1 => Some((BlockFormat::Q4_1, q)),
                GgmlDType::Q8_0 => Some((BlockFormat::Q8_0, q)),
                _ => None,
            },
            _ => None,
        };
        if let Some((format, q)) = format {
            let matrix = QuantMatrix::from_gguf_blocks(format, rows, cols, &q.data()?)
                .map_err(candle_core::Error::wrap)?;
            return Ok(Self::Kernel(matrix));
        }
        Ok(Self::Candle { weight, rows, cols })
    }

    fn rows(&self) -> usize {
        match self {
            Self::Kernel(w) => w.rows(),
            Self::Candle { rows, .. } => *rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Self::Kernel(w) => w.cols(),
            Self::Candle { cols, .. } => *cols,
        }
    }

    /// `outs[i] = x · Wᵢᵀ` for a `[T, in]` `x` and matrices of one width; each `outs[i]` is
    /// resized to `[T, outᵢ]`. When all are kernel matrices, in one kernel pass (one
    /// quantization of `x`, one parallel loop).
    fn run_all<const N: usize>(
        ws: [&Matmul; N],
        x: &[f32],
        mut outs: [&mut Vec<f32>; N],
    ) -> Result<(), ModelError> {
        let t = x.len() / ws.first().map_or(1, |w| w.cols().max(1));
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            out.resize(t * w.rows(), 0.0);
        }
        let kernel: Option<Vec<&QuantMatrix>> = ws
            .iter()
            .map(|w| match w {
                Self::Kernel(m) => Some(m),
                Self::Candle { .. } => None,
            })
            .collect();
        if let Some(mats) = kernel {
            let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            kernels::matmul_many(&mats, x, &mut slices).map_err(candle_core::Error::wrap)?;
            return Ok(());
        }
        for (w, out) in ws.iter().zip(outs) {
            match w {
                Self::Kernel(m) => {
                    kernels::matmul_many(&[m], x, &mut [out.as_mut_slice()])
                        .map_err(candle_core::Error::wrap)?;
                }
                Self::Candle { weight, cols, .. } => {
                    let x = Tensor::from_slice(x, (t, *cols), &Device::Cpu)?;
                    with_f32(&weight.forward(&x)?, |y| out.copy_from_slice(y))?;
                }
            }
        }
        Ok(())
    }
}

/// A projection: matmul plus an optional bias (qwen2's q/k/v). Loaders build it (and
/// [`Layer`]) over candle's `QMatMul`; [`LlamaModel::new`] turns that into a [`Matmul`].
pub(crate) struct Linear<M = QMatMul> {
    weight: M,
    bias: Option<Vec<f32>>,
}

impl Linear {
    pub(crate) fn new(weight: QMatMul, bias: Option<Tensor>) -> Result<Self, ModelError> {
        Ok(Self {
            weight,
            bias: bias.as_ref().map(f32_values).transpose()?,
        })
    }

    fn prepare(self) -> Result<Linear<Matmul>, ModelError> {
        Ok(Linear {
            weight: Matmul::new(self.weight)?,
            bias: self.bias,
        })
    }
}

impl Linear<Matmul> {
    /// Several projections of one `x` (q, k, v), their matmuls in one pass; see
    /// [`Matmul::run_all`].
    fn run_all<const N: usize>(
        ls: [&Self; N],
        x: &[f32],
        mut outs: [&mut Vec<f32>; N],
    ) -> Result<(), ModelError> {
        Matmul::run_all(ls.map(|l| &l.weight), x, outs.each_mut().map(|o| &mut **o))?;
        for (l, out) in ls.iter().zip(outs) {
            if let Some(bias) = &l.bias {
                for row in out.chunks_exact_mut(bias.len()) {
                    for (y, b) in row.iter_mut().zip(bias) {
                        *y += b;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The values of a 1-D weight (norm scales, biases) as f32.
fn f32_values(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

pub(crate) struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn new(weight: Tensor, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: f32_values(&weight)?,
            eps: eps as f32,
        })
    }

    /// `x += residual` when one is given (the residual stream taking a sublayer's output),
    /// then `out = x / sqrt(mean(x²) + eps) · weight`, row by row in one pass. Bit for bit
    /// candle's add and norm: each row's squares are summed in order (on the Q4_1 model a
    /// last-bit change of the norm flips activation quantizations and moved a greedy token
    /// against the candle oracle). Rows go [`SUM_ROWS`] at a time so that their independent
    /// sums overlap.
    fn run(&self, x: &mut [f32], residual: Option<&[f32]>, out: &mut Vec<f32>) {
        let (w, eps) = (&self.weight[..], self.eps);
        let n = w.len().max(1);
        out.resize(x.len(), 0.0);
        let rows = pool::task_len(x.len() / n, ELEMENTWISE_MIN.div_ceil(n), SUM_ROWS);
        let chunk = rows * n;
        let mut residuals = residual.map(|r| r.chunks(chunk));
        let mut tasks: Vec<_> = out
            .chunks_mut(chunk)
            .zip(x.chunks_mut(chunk))
            .map(|(out, x)| (out, x, residuals.as_mut().and_then(Iterator::next)))
            .collect();
        pool::for_each_mut(&mut tasks, |(out, x, residual)| {
            if let Some(r) = residual {
                for (x, r) in x.iter_mut().zip(*r) {
                    *x += r;
                }
            }
            for (out, x) in out.chunks_mut(SUM_ROWS * n).zip(x.chunks(SUM_ROWS * n)) {
                let sums = sums_of_squares(x, n);
                for ((out, x), &sum2) in out.chunks_exact_mut(n).zip(x.chunks_exact(n)).zip(&sums) {
                    let m = (sum2 / n as f32 + eps).sqrt();
                    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
                        *o = x / m * w;
                    }
                }
            }
        });
    }
}

/// Rows whose sums of squares [`RmsNorm::run`] accumulates together: one per lane of a vector.
const SUM_ROWS: usize = 8;

/// The sums of squares of the (at most [`SUM_ROWS`]) `n`-wide rows of `x`, each summed in
/// order, one product at a time (see [`RmsNorm::run`]). A full set of rows goes 8 columns at a
/// time through a transpose, so that lane `r` of one vector adds row `r`'s squares in order.
fn sums_of_squares(x: &[f32], n: usize) -> [f32; SUM_ROWS] {
    let rows = x.len() / n;
    let mut sums = [0f32; SUM_ROWS];
    let mut done = 0;
    if rows == SUM_ROWS {
        let mut acc = f32x8::ZERO;
        let at = |r: usize, i: usize| -> [f32; 8] {
            let mut v = [0f32; 8];
            v.copy_from_slice(&x[r * n + i..][..8]);
            v
        };
        while done + 8 <= n {
            let columns = f32x8::transpose(std::array::from_fn(|r| f32x8::new(at(r, done))));
            for c in columns {
                acc = acc + c * c;
            }
            done += 8;
        }
        sums.copy_from_slice(&acc.to_array());
    }
    for i in done..n {
        for (r, sum) in sums[..rows].iter_mut().enumerate() {
            let v = x[r * n + i];
            *sum += v * v;
        }
    }
    sums
}

/// One decoder block's weights.
pub(crate) struct Layer<M = QMatMul> {
    pub attn_norm: RmsNorm,
    pub q: Linear<M>,
    pub k: Linear<M>,
    pub v: Linear<M>,
    pub o: Linear<M>,
    pub ffn_norm: RmsNorm,
    pub gate: M,
    pub up: M,
    pub down: M,
}

impl Layer {
    fn prepare(self) -> Result<Layer<Matmul>, ModelError> {
        Ok(Layer {
            attn_norm: self.attn_norm,
            q: self.q.prepare()?,
            k: self.k.prepare()?,
            v: self.v.prepare()?,
            o: self.o.prepare()?,
            ffn_norm: self.ffn_norm,
            gate: Matmul::new(self.gate)?,
            up: Matmul::new(self.up)?,
            down: Matmul::new(self.down)?,
        })
    }
}

impl Layer<Matmul> {
    /// Multiply-adds of the block's projections for one row.
    fn macs_per_row(&self) -> usize {
        let linears = [&self.q, &self.k, &self.v, &self.o].map(|l| &l.weight);
        linears
            .into_iter()
            .chain([&self.gate, &self.up, &self.down])
            .map(|m| m.rows() * m.cols())
            .sum()
    }
}

/// One row group's activations, `[rows, width]` row-major, reused by every layer of the step.
#[derive(Default)]
struct Activations {
    /// The residual stream, `[rows, hidden]`.
    x: Vec<f32>,
    /// Normed input of the attention or the MLP, `[rows, hidden]`.
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, `[rows, heads · head_dim]`.
    attn: Vec<f32>,
    /// Output projection or MLP down projection, `[rows, hidden]`, added to `x`.
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// A step runs as `G` row groups, one per thread (see [`LlamaModel::forward`]), when each
/// group gets at least `GROUP_ROWS_PER_GROUP · G` rows. Every group streams all the weights
/// for its own rows, so `G` groups read the weights `G` times per step, and a group's compute
/// must grow with `G` to cover that. In return the pool's ~13 forks and joins per layer, and
/// the serial stretches between them, shrink to two joins per layer. On the 2-vCPU VM
/// (forward_step, decode, docs/BENCHMARKS.md round 6) two groups took 2-4% off an 8-row
/// step, 6% off 10 rows, 6-11% off 16 rows and 9-11% off 32 and 64. Machines with more
/// threads were not measured: there groups start at `2 · G²` rows.
const GROUP_ROWS_PER_GROUP: usize = 2;

/// What one attention multiply-add costs in projection multiply-adds on the CPU path (f16
/// K/V read from scattered blocks, against the int8 matmul kernels): about 5 on the 2-vCPU
/// VM at 16 decode rows, context 200 (the kernels' `attention` bench, 15.5 GMAC/s, against
/// the `quant_matmul` bench, 82 GMAC/s).
const ATTENTION_MAC_COST: usize = 5;

/// A contiguous run of one step's rows that goes through the layers together: its
/// sequences' pieces (query rows renumbered from the group's first row) and its activations.
struct RowGroup<'a> {
    rows: Range<usize>,
    seqs: Vec<SeqAttn<'a>>,
    a: Activations,
}

impl<'a> RowGroup<'a> {
    /// How many groups a step of `rows` rows runs in: one per thread when each group would
    /// get at least [`GROUP_ROWS_PER_GROUP`] rows per group, else one.
    fn count(rows: usize, threads: usize) -> usize {
        if threads > 1 && rows >= GROUP_ROWS_PER_GROUP * threads * threads {
            threads
        } else {
            1
        }
    }

    /// The step's rows in at most `n` contiguous groups of about equal work: a row's work is
    /// `row_work` (its projections, in context tokens' worth of attention) plus its context
    /// length. A sequence's query rows may be cut between two groups: each piece attends as
    /// the last rows of a context that ends with it (the causal mask does the rest).
    fn split(input: &StepInput<'a>, n: usize, row_work: usize) -> Vec<Self> {
        let t = input.token_ids.len();
        if n <= 1 {
            return vec![Self::new(input, 0..t)];
        }
        let mut work = vec![row_work as u64; t];
        for s in input.seqs {
            let first_pos = s.context_len - s.query_len;
            for (i, w) in work[s.query_start..][..s.query_len].iter_mut().enumerate() {
                *w += (first_pos + i + 1) as u64;
            }
        }
        let (total, n) = (work.iter().sum::<u64>(), n as u64);
        // Group g ends after the first row where the running work reaches g+1 n-ths.
        let mut ends = Vec::new();
        let mut done = 0;
        for (r, w) in work.iter().enumerate() {
            done += w;
            while (ends.len() as u64) < n - 1 && done * n >= total * (ends.len() as u64 + 1) {
                ends.push(r + 1);
            }
        }
        ends.push(t);
        ends.dedup();
        let starts = std::iter::once(0).chain(ends.iter().copied());
        starts
            .zip(&ends)
            .filter(|&(start, &end)| start < end)
            .map(|(start, &end)| Self::new(input, start..end))
            .collect()
    }

    /// The group of rows `rows`, with the pieces of the sequences that have query rows there.
    fn new(input: &StepInput<'a>, rows: Range<usize>) -> Self {
        let seqs = input
            .seqs
            .iter()
            .filter_map(|s| {
                let (first, end) = (s.query_start, s.query_start + s.query_len);
                let (lo, hi) = (first.max(rows.start), end.min(rows.end));
                (lo < hi).then(|| SeqAttn {
                    block_table: s.block_table,
                    context_len: s.context_len - (end - hi),
                    query_start: lo - rows.start,
                    query_len: hi - lo,
                })
            })
            .collect();
        Self {
            rows,
            seqs,
            a: Activations::default(),
        }
    }

    /// Runs `stage` on every group: a lone group on this thread (its loops spread over the
    /// pool), several as one task each (their loops then run on that task's thread).
    fn run_all(
        groups: &mut [Self],
        stage: impl Fn(&mut Self) -> Result<(), ModelError> + Sync,
    ) -> Result<(), ModelError> {
        if let [group] = groups {
            return stage(group);
        }
        let mut results: Vec<_> = groups.iter_mut().map(|g| (g, Ok(()))).collect();
        pool::for_each_mut(&mut results, |(g, result)| *result = stage(g));
        results.into_iter().try_for_each(|(_, r)| r)
    }
}

/// A loaded llama-family model. Immutable: all per-sequence state lives in the KV cache.
pub struct LlamaModel {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    vocab_size: usize,
    /// `[vocab, hidden]` f32, rows copied per token.
    embed: Tensor,
    layers: Vec<Layer<Matmul>>,
    norm: RmsNorm,
    lm_head: Matmul,
    rope: RopeStyle,
    /// `[max_position_embeddings, head_dim / 2]` tables, rows read per token position.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// A row's projections cost as much as attention over this many context tokens; weighs
    /// rows when a step is split into row groups.
    row_work: usize,
}

impl LlamaModel {
    /// Assembles a model from loaded weights (shapes already checked by the loader).
    pub(crate) fn new(
        config: &ModelConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: RmsNorm,
        lm_head: QMatMul,
        rope: RopeStyle,
    ) -> Result<Self, ModelError> {
        let (cos, sin) = rope_tables(config)?;
        let layers: Vec<Layer<Matmul>> = layers
            .into_iter()
            .map(Layer::prepare)
            .collect::<Result<_, _>>()?;
        let projection_macs: usize = layers.iter().map(Layer::macs_per_row).sum();
        let attention_macs = 2 * config.num_heads * config.head_dim * layers.len();
        let row_work = projection_macs / (ATTENTION_MAC_COST * attention_macs).max(1);
        Ok(Self {
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            hidden: config.hidden_size,
            vocab_size: config.vocab_size,
            embed: embed.to_dtype(DType::F32)?.contiguous()?,
            layers,
            norm,
            lm_head: Matmul::new(lm_head)?,
            rope,
            cos,
            sin,
            row_work,
        })
    }

    /// The KV-cache geometry this model needs for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_layout(&self, num_blocks: usize, block_size: usize) -> KvLayout {
        KvLayout {
            num_layers: self.layers.len(),
            num_blocks,
            block_size,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Runs one engine step: all tokens of all scheduled sequences flattened into one batch
    /// (rows), writes their K/V into `cache` at `slots`, attends through the block tables,
    /// and leaves in `logits` the logits (vocab-sized) of each row listed in `logits_rows`, in
    /// that order.
    ///
    /// A batch of at least `2 · threads²` rows (8 on two threads) is split into one contiguous
    /// group of rows per thread, and each group goes through a layer's stages on its own
    /// thread; a smaller batch is one group whose stages spread each loop over the threads.
    /// Either way a row's results are the same bit for bit (every kernel computes a row on
    /// its own).
    pub fn forward(
        &self,
        input: &StepInput,
        cache: &mut CpuKvCache,
        logits: &mut Logits,
    ) -> Result<(), ModelError> {
        let groups = RowGroup::count(input.token_ids.len(), pool::threads());
        self.forward_in_groups(input, cache, logits, groups)
    }

    /// [`Self::forward`] with the rows split into `groups` groups.
    fn forward_in_groups(
        &self,
        input: &StepInput,
        cache: &mut CpuKvCache,
        logits: &mut Logits,
        groups: usize,
    ) -> Result<(), ModelError> {
        let layout = *cache.layout();
        self.validate(input, &layout)?;
        let mut groups = RowGroup::split(input, groups, self.row_work);
        with_f32(&self.embed, |embed| {
            for g in &mut groups {
                for &id in &input.token_ids[g.rows.clone()] {
                    g.a.x
                        .extend_from_slice(&embed[id as usize * self.hidden..][..self.hidden]);
                }
            }
        })?;
        for (i, layer) in self.layers.iter().enumerate() {
            RowGroup::run_all(&mut groups, |g| {
                self.attention_input(i, layer, &input.positions[g.rows.clone()], &mut g.a)
            })?;
            // Every group's K/V is in the cache before any group attends: a sequence split
            // between groups attends to rows of both.
            for g in &groups {
                cache.write_kv(i, &input.slots[g.rows.clone()], &g.a.k, &g.a.v);
            }
            let cache = &*cache;
            RowGroup::run_all(&mut groups, |g| {
                self.attention_and_mlp(i, layer, cache, &g.seqs, &mut g.a)
            })?;
        }

        // The LM head is the largest matmul: run it only on the rows that need logits (none
        // for a prefill chunk that does not end its prompt); the last MLP output joins those
        // rows' residual stream as they are gathered.
        let hidden = self.hidden;
        let gather = |rows: &[usize]| {
            let mut last = Vec::with_capacity(rows.len() * hidden);
            for &r in rows {
                let g = &groups[groups.partition_point(|g| g.rows.end <= r)];
                let at = (r - g.rows.start) * hidden;
                let x = &g.a.x[at..][..hidden];
                if self.layers.is_empty() {
                    last.extend_from_slice(x);
                } else {
                    last.extend(x.iter().zip(&g.a.proj[at..]).map(|(x, p)| x + p));
                }
            }
            last
        };
        logits.hidden_size = hidden;
        logits.hidden.clear();
        if !input.hidden_rows.is_empty() {
            self.norm
                .run(&mut gather(input.hidden_rows), None, &mut logits.hidden);
        }
        let mut normed = Vec::new();
        self.norm
            .run(&mut gather(input.logits_rows), None, &mut normed);
        logits.vocab = self.lm_head.rows();
        Matmul::run_all([&self.lm_head], &normed, [&mut logits.data])
    }

    /// A layer's first stage for one group's rows: the attention norm (the previous layer's
    /// MLP output joining the residual stream in its pass), q/k/v, and RoPE.
    fn attention_input(
        &self,
        i: usize,
        layer: &Layer<Matmul>,
        positions: &[usize],
        a: &mut Activations,
    ) -> Result<(), ModelError> {
        let mlp_out = (i > 0).then_some(&a.proj[..]);
        layer.attn_norm.run(&mut a.x, mlp_out, &mut a.h);
        Linear::run_all(
            [&layer.q, &layer.k, &layer.v],
            &a.h,
            [&mut a.q, &mut a.k, &mut a.v],
        )?;
        self.apply_rope(&mut a.q, &mut a.k, positions);
        Ok(())
    }

    /// A layer's second stage for one group's rows (their K/V already in `cache`): attention
    /// through `seqs`, the output projection, and the MLP, whose output is left in `a.proj`.
    fn attention_and_mlp(
        &self,
        i: usize,
        layer: &Layer<Matmul>,
        cache: &CpuKvCache,
        seqs: &[SeqAttn],
        a: &mut Activations,
    ) -> Result<(), ModelError> {
        let (nh, hd) = (self.num_heads, self.head_dim);
        // Same shape as q: `[rows, heads · head_dim]`.
        a.attn.resize(a.q.len(), 0.0);
        let scale = 1.0 / (hd as f32).sqrt();
        cache.attend(i, &a.q, nh, seqs, scale, &mut a.attn);
        Linear::run_all([&layer.o], &a.attn, [&mut a.proj])?;

        layer.ffn_norm.run(&mut a.x, Some(&a.proj), &mut a.h);
        Matmul::run_all([&layer.gate, &layer.up], &a.h, [&mut a.gate, &mut a.up])?;
        // silu(gate) · up, with candle's silu formula.
        zip_assign(&mut a.gate, &a.up, |g, u| g / (f32x8::ONE + (-g).exp()) * u);
        Matmul::run_all([&layer.down], &a.gate, [&mut a.proj])
    }

    /// Rotates each head of each row of `q` and `k` (`[T, heads · head_dim]`) by its row's
    /// position, in place, with candle's `rope_i` / `rope` arithmetic; rows in parallel.
    fn apply_rope(&self, q: &mut [f32], k: &mut [f32], positions: &[usize]) {
        let t = positions.len().max(1);
        let (q_width, k_width) = (q.len() / t, k.len() / t);
        let rows = pool::task_len(t, ELEMENTWISE_MIN.div_ceil((q_width + k_width).max(1)), 1);
        let mut tasks: Vec<_> = q
            .chunks_mut(rows * q_width)
            .zip(k.chunks_mut(rows * k_width))
            .zip(positions.chunks(rows))
            .collect();
        pool::for_each_mut(&mut tasks, |((q, k), positions)| {
            self.rotate(q, positions);
            self.rotate(k, positions);
        });
    }

    /// [`Self::apply_rope`] of one matrix's rows.
    fn rotate(&self, x: &mut [f32], positions: &[usize]) {
        let hd = self.head_dim;
        let half = hd / 2;
        let width = x.len() / positions.len().max(1);
        for (row, &pos) in x.chunks_exact_mut(width).zip(positions) {
            let (cos, sin) = (
                &self.cos[pos * half..][..half],
                &self.sin[pos * half..][..half],
            );
            for head in row.chunks_exact_mut(hd) {
                for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
                    let (i1, i2) = match self.rope {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (x1, x2) = (head[i1], head[i2]);
                    head[i1] = x1 * c - x2 * s;
                    head[i2] = x1 * s + x2 * c;
                }
            }
        }
    }

    /// Rejects inputs that would index out of bounds in the kernels or the tables.
    fn validate(&self, input: &StepInput, layout: &KvLayout) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::InvalidInput(msg));
        let t = input.token_ids.len();
        if t == 0 {
            return bad("a step needs at least one token".into());
        }
        if input.positions.len() != t || input.slots.len() != t {
            return bad(format!(
                "{t} tokens but {} positions and {} slots",
                input.positions.len(),
                input.slots.len()
            ));
        }
        let expected = self.kv_layout(layout.num_blocks, layout.block_size);
        if *layout != expected {
            return bad(format!(
                "KV cache layout {layout:?} does not fit the model ({expected:?})"
            ));
        }
        if let Some(id) = input
            .token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return bad(format!("token id {id} >= vocab size {}", self.vocab_size));
        }
        let max_pos = self.cos.len() / (self.head_dim / 2).max(1);
        if let Some(p) = input.positions.iter().find(|&&p| p >= max_pos) {
            return bad(format!("position {p} >= max position embeddings {max_pos}"));
        }
        let num_slots = layout.num_blocks * layout.block_size;
        if let Some(s) = input.slots.iter().find(|&&s| s >= num_slots) {
            return bad(format!("slot {s} >= {num_slots} cache slots"));
        }
        for s in input.seqs {
            if s.query_start + s.query_len > t
                || s.query_len > s.context_len
                || s.block_table.len() * layout.block_size < s.context_len
                || s.block_table
                    .iter()
                    .any(|&b| b as usize >= layout.num_blocks)
            {
                return bad(format!(
                    "sequence {s:?} is inconsistent with {t} rows and {layout:?}"
                ));
            }
        }
        if let Some(r) = input
            .logits_rows
            .iter()
            .chain(input.hidden_rows)
            .find(|&&r| r >= t)
        {
            return bad(format!("output row {r} >= {t} rows"));
        }
        Ok(())
    }
}

/// Calls `f` on the f32 data of a contiguous CPU tensor without copying it.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(ModelError::InvalidInput(
            "expected a contiguous CPU tensor".into(),
        ));
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// Fewest elements per parallel task of the elementwise loops (see [`pool::task_len`]): a
/// single decode row's stay on one thread, where a fork costs more than they do; a 16-row
/// batch and a prefill chunk split over the cores.
const ELEMENTWISE_MIN: usize = 1 << 12;

/// `a[i] = f(a[i], b[i])`, 8 lanes at a time (see the module doc for why not candle's
/// elementwise ops). Each element is computed on its own, so neither the split into tasks nor
/// the lanes change any result.
fn zip_assign(a: &mut [f32], b: &[f32], f: impl Fn(f32x8, f32x8) -> f32x8 + Sync) {
    debug_assert_eq!(a.len(), b.len());
    let chunk = pool::task_len(a.len(), ELEMENTWISE_MIN, 8);
    let mut tasks: Vec<_> = a.chunks_mut(chunk).zip(b.chunks(chunk)).collect();
    pool::for_each_mut(&mut tasks, |(a, b)| {
        let ((a, a_tail), (b, b_tail)) = (a.as_chunks_mut(), b.as_chunks());
        for (a, b) in a.iter_mut().zip(b) {
            *a = f(f32x8::new(*a), f32x8::new(*b)).to_array();
        }
        // The last few elements through a zero-padded vector.
        let pad = |s: &[f32]| {
            let mut v = [0f32; 8];
            v[..s.len()].copy_from_slice(s);
            f32x8::new(v)
        };
        let tail = f(pad(a_tail), pad(b_tail)).to_array();
        let n = a_tail.len();
        a_tail.copy_from_slice(&tail[..n]);
    });
}

/// RoPE cos/sin tables (`[max_position_embeddings, head_dim / 2]`), computed exactly as
/// candle-transformers' `precomput_freqs_cis`.
fn rope_tables(config: &ModelConfig) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let dev = Device::Cpu;
    let hd = config.head_dim;
    let theta: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1f32 / config.rope_theta.powf(i as f32 / hd as f32))
        .collect();
    let n = config.max_position_embeddings;
    let theta = Tensor::new(theta.as_slice(), &dev)?;
    let idx_theta = Tensor::arange(0, n as u32, &dev)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .matmul(&theta.reshape((1, hd / 2))?)?;
    Ok((
        idx_theta.cos()?.flatten_all()?.to_vec1()?,
        idx_theta.sin()?.flatten_all()?.to_vec1()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{gguf_path, smollm, smollm_f16, smollm_f16_gguf};
    use crate::model::LoadedModel;
    use candle_transformers::models::quantized_llama::ModelWeights;
    use kernels::KvDtype;
    use rand::seq::SliceRandom;
    use rand::Rng;
    use rand::SeedableRng;

    /// One sequence's part of a test step.
    struct Part<'a> {
        tokens: &'a [u32],
        /// Position of `tokens[0]` in its sequence.
        start: usize,
        block_table: &'a [u32],
        /// Return the logits of every row of the part, not just its last.
        all_logits: bool,
    }

    /// Flattens parts into one engine step, as the scheduler would, and runs it.
    fn step(
        model: &LlamaModel,
        cache: &mut CpuKvCache,
        parts: &[Part],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        step_in_groups(model, cache, parts, None)
    }

    /// [`step`] with the rows in `groups` row groups (`None`: as `forward` splits them).
    fn step_in_groups(
        model: &LlamaModel,
        cache: &mut CpuKvCache,
        parts: &[Part],
        groups: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let bs = cache.layout().block_size;
        let (mut ids, mut positions, mut slots, mut rows) = (vec![], vec![], vec![], vec![]);
        let mut seqs = vec![];
        for p in parts {
            let query_start = ids.len();
            for (i, &tok) in p.tokens.iter().enumerate() {
                let pos = p.start + i;
                ids.push(tok);
                positions.push(pos);
                slots.push(p.block_table[pos / bs] as usize * bs + pos % bs);
                if p.all_logits || i + 1 == p.tokens.len() {
                    rows.push(query_start + i);
                }
            }
            seqs.push(SeqAttn {
                block_table: p.block_table,
                context_len: p.start + p.tokens.len(),
                query_start,
                query_len: p.tokens.len(),
            });
        }
        let input = StepInput {
            token_ids: &ids,
            positions: &positions,
            slots: &slots,
            seqs: &seqs,
            logits_rows: &rows,
            hidden_rows: &[],
        };
        let mut logits = Logits::default();
        match groups {
            None => model.forward(&input, cache, &mut logits)?,
            Some(n) => model.forward_in_groups(&input, cache, &mut logits, n)?,
        }
        Ok(logits.iter().map(<[f32]>::to_vec).collect())
    }

    fn argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn chatml(m: &LoadedModel, user: &str) -> Vec<u32> {
        let template = m.chat_template.as_ref().unwrap();
        let msgs = serde_json::json!([{"role": "user", "content": user}]);
        let text = template.render(&msgs, true, None).unwrap();
        m.tokenizer.encode(&text, false).unwrap()
    }

    fn shuffled_blocks(n: usize, seed: u64) -> Vec<u32> {
        let mut blocks: Vec<u32> = (0..n as u32).collect();
        blocks.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        blocks
    }

    /// Result of running prompts through our paged forward and through quantized_llama.
    struct OracleRun {
        /// Per prompt: the greedy token of each of 9 steps (prefill + 8 decodes), ours and the
        /// oracle's, both sides fed the oracle's tokens.
        tokens: Vec<(Vec<u32>, Vec<u32>)>,
        /// At each divergence: how far below its own top logit the oracle put our token.
        divergence_gaps: Vec<f32>,
        worst_first: f32,
        worst_all: f32,
    }

    /// Paged, batched forward vs candle-transformers' quantized_llama on the same GGUF bytes:
    /// whole prompt prefilled in one step into shuffled blocks of 16, then 8 greedy decode
    /// steps, both sides fed the oracle's greedy tokens.
    fn run_against_oracle(
        m: &LoadedModel,
        gguf: &mut (impl std::io::Read + std::io::Seek),
    ) -> OracleRun {
        let ct = candle_core::quantized::gguf_file::Content::read(gguf).unwrap();
        let mut oracle = ModelWeights::from_gguf(ct, gguf, &Device::Cpu).unwrap();
        let plain = |s: &str| m.tokenizer.encode(s, false).unwrap();
        let prompts = [
            chatml(m, "What is the capital of France?"),
            plain("The quick brown fox jumps over the lazy"),
            chatml(
                m,
                "Write a haiku about the sea, then explain it in one sentence.",
            ),
        ];
        let oracle_logits = |oracle: &mut ModelWeights, ids: &[u32], pos: usize| -> Vec<f32> {
            let input = Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            oracle
                .forward(&input, pos)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let mut run = OracleRun {
            tokens: vec![],
            divergence_gaps: vec![],
            worst_first: 0.0,
            worst_all: 0.0,
        };
        for (n, prompt) in prompts.iter().enumerate() {
            let mut cache = CpuKvCache::new(m.model.kv_layout(64, 16), KvDtype::F32);
            let table = shuffled_blocks(64, n as u64);
            oracle.clear_kv_cache();
            let prefill = Part {
                tokens: prompt,
                start: 0,
                block_table: &table,
                all_logits: false,
            };
            let mut ours = step(&m.model, &mut cache, &[prefill]).unwrap().remove(0);
            let mut theirs = oracle_logits(&mut oracle, prompt, 0);
            run.worst_first = run.worst_first.max(max_abs_diff(&ours, &theirs));
            let (mut ours_tokens, mut oracle_tokens) = (vec![], vec![]);
            for i in 0..=8 {
                run.worst_all = run.worst_all.max(max_abs_diff(&ours, &theirs));
                let (a, b) = (argmax(&ours), argmax(&theirs));
                if a != b {
                    run.divergence_gaps
                        .push(theirs[b as usize] - theirs[a as usize]);
                }
                ours_tokens.push(a);
                oracle_tokens.push(b);
                if i == 8 {
                    break;
                }
                // Both sides go on with the oracle's token, so a split at a near-tie does not
                // turn the rest of the run into a comparison of different texts.
                let pos = prompt.len() + i;
                let part = Part {
                    tokens: &[b],
                    start: pos,
                    block_table: &table,
                    all_logits: false,
                };
                ours = step(&m.model, &mut cache, &[part]).unwrap().remove(0);
                theirs = oracle_logits(&mut oracle, &[b], pos);
            }
            run.tokens.push((ours_tokens, oracle_tokens));
        }
        run
    }

    /// A full set of rows (the transposed path) sums each row's squares exactly as one row
    /// alone does: in order, one rounded product at a time; widths off multiples of 8 too.
    #[test]
    fn sums_of_squares_are_each_rows_sequential_sum() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for n in [576, 61, 8, 3] {
            let x: Vec<f32> = (0..SUM_ROWS * n)
                .map(|_| (rng.random::<f32>() - 0.5) * 10f32.powi(rng.random_range(-3..3)))
                .collect();
            let sums = sums_of_squares(&x, n);
            for (r, row) in x.chunks_exact(n).enumerate() {
                let alone = row.iter().fold(0f32, |s, v| s + v * v);
                assert_eq!(sums[r].to_bits(), sums_of_squares(row, n)[0].to_bits());
                assert_eq!(sums[r].to_bits(), alone.to_bits(), "n={n} row {r}");
            }
        }
    }

    /// On F16-stored weights (f32 matmuls) both implementations compute the same function and
    /// only the attention kernel differs: observed max |logit diff| 7e-5 over all steps.
    #[test]
    fn matches_quantized_llama_oracle_on_dequantized_weights() {
        let (Some(m), Some(bytes)) = (smollm_f16(), smollm_f16_gguf()) else {
            return;
        };
        let run = run_against_oracle(m, &mut std::io::Cursor::new(bytes));
        eprintln!(
            "F16 weights: max |logit diff| first step {}, all steps {}",
            run.worst_first, run.worst_all
        );
        for (n, (ours, theirs)) in run.tokens.iter().enumerate() {
            assert_eq!(ours, theirs, "prompt {n}");
            assert_eq!(ours.len(), 9);
        }
        assert!(
            run.worst_first < 1e-3,
            "first-step logits differ by {}",
            run.worst_first
        );
        assert!(run.worst_all < 1e-3, "logits differ by {}", run.worst_all);
    }

    /// On the Q4_1 file candle's quantized matmul rounds each activation row to 8 bits per
    /// block of 32; with this model's large activations one flipped rounding moves logits by
    /// ~0.5, so any difference in attention arithmetic shows up at that scale
    /// (quantized_llama against itself, prefill vs prefill+decode of the same 17 tokens:
    /// 0.47). Observed: first-step max |logit diff| 1.2-1.5; 25 to 27 of the 27 greedy tokens
    /// agree, as float reorderings in attention or the norms push near-ties one way or the
    /// other (oracle gaps at the splits 0.04-0.28). So: tokens agree except at near-ties,
    /// logits within the rounding noise.
    #[test]
    fn matches_quantized_llama_oracle_on_q4_1() {
        let Some(m) = smollm() else { return };
        let mut file = std::io::BufReader::new(std::fs::File::open(gguf_path()).unwrap());
        let run = run_against_oracle(m, &mut file);
        for (n, (ours, theirs)) in run.tokens.iter().enumerate() {
            eprintln!("Q4_1 prompt {n}: ours {ours:?} oracle {theirs:?}");
        }
        eprintln!(
            "Q4_1: max |logit diff| first step {}; divergence gaps {:?}",
            run.worst_first, run.divergence_gaps
        );
        assert!(
            run.worst_first < 2.0,
            "first-step logits differ by {}",
            run.worst_first
        );
        assert!(
            run.divergence_gaps.iter().all(|&g| g < 0.5),
            "diverged where the oracle was sure: {:?}",
            run.divergence_gaps
        );
        let agreed: usize = run
            .tokens
            .iter()
            .map(|(ours, theirs)| ours.iter().zip(theirs).filter(|(a, b)| a == b).count())
            .sum();
        assert!(agreed >= 24, "only {agreed} of 27 greedy tokens agree");
    }

    /// Four prompts of different lengths (16, 7, 9 and 3 tokens or so) for mixed steps.
    fn mixed_prompts(m: &LoadedModel) -> [Vec<u32>; 4] {
        [
            "Paged attention stores the KV cache in fixed-size blocks, so that memory",
            "Hello there, how are you?",
            "One, two, three, four,",
            "The sky is",
        ]
        .map(|s| m.tokenizer.encode(s, false).unwrap())
    }

    /// One step mixing two prefill chunks (one continuing cached blocks, one fresh) and two
    /// decodes gives the same logits as running each on its own.
    #[test]
    fn batched_step_equals_separate_steps() {
        let Some(m) = smollm() else { return };
        let [a, b, c, d] = mixed_prompts(m);
        let block_size = 4;
        let blocks = shuffled_blocks(64, 42);
        let tables: Vec<&[u32]> = blocks.chunks(16).collect();
        let split = 7;

        // Same history in both caches: A's first chunk, C's and D's prompts.
        let mut caches =
            [0, 1].map(|_| CpuKvCache::new(m.model.kv_layout(64, block_size), KvDtype::F32));
        let mut next = vec![];
        for cache in caches.iter_mut() {
            let setup = step(
                &m.model,
                cache,
                &[
                    Part {
                        tokens: &a[..split],
                        start: 0,
                        block_table: tables[0],
                        all_logits: false,
                    },
                    Part {
                        tokens: &c,
                        start: 0,
                        block_table: tables[2],
                        all_logits: false,
                    },
                    Part {
                        tokens: &d,
                        start: 0,
                        block_table: tables[3],
                        all_logits: false,
                    },
                ],
            )
            .unwrap();
            next = vec![argmax(&setup[1]), argmax(&setup[2])];
        }
        let parts = [
            Part {
                tokens: &a[split..],
                start: split,
                block_table: tables[0],
                all_logits: true,
            },
            Part {
                tokens: &b,
                start: 0,
                block_table: tables[1],
                all_logits: false,
            },
            Part {
                tokens: &next[..1],
                start: c.len(),
                block_table: tables[2],
                all_logits: false,
            },
            Part {
                tokens: &next[1..],
                start: d.len(),
                block_table: tables[3],
                all_logits: false,
            },
        ];
        let [batched_cache, separate_cache] = &mut caches;
        let batched = step(&m.model, batched_cache, &parts).unwrap();
        let separate: Vec<Vec<f32>> = parts
            .iter()
            .flat_map(|p| step(&m.model, separate_cache, std::slice::from_ref(p)).unwrap())
            .collect();
        assert_eq!(batched.len(), a.len() - split + 3);
        assert_eq!(batched.len(), separate.len());
        let worst = batched
            .iter()
            .zip(&separate)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        // Matmuls and attention compute each row by itself: exactly equal, not just close.
        assert_eq!(worst, 0.0, "batched logits differ by {worst}");
    }

    #[test]
    fn steps_split_into_row_groups_only_with_enough_rows_per_thread() {
        assert_eq!(RowGroup::count(16, 2), 2);
        assert_eq!(RowGroup::count(8, 2), 2);
        assert_eq!(RowGroup::count(7, 2), 1);
        assert_eq!(RowGroup::count(512, 1), 1);
        assert_eq!(RowGroup::count(31, 4), 1);
        assert_eq!(RowGroup::count(32, 4), 4);
        assert_eq!(RowGroup::count(511, 16), 1);
        assert_eq!(RowGroup::count(512, 16), 16);
    }

    /// Row groups cover the step's rows in order, weighted by work: a prompt's later rows
    /// (longer contexts) go in smaller groups, equal decode rows in equal ones, and a step
    /// with fewer rows than groups gets no empty group.
    #[test]
    fn row_groups_balance_projections_and_attention() {
        let table: Vec<u32> = (0..64).collect();
        let groups = |seqs: &[SeqAttn], t: usize, n: usize, row_work: usize| {
            let ids = vec![0u32; t];
            let pos = vec![0usize; t];
            let input = StepInput {
                token_ids: &ids,
                positions: &pos,
                slots: &pos,
                seqs,
                logits_rows: &[],
                hidden_rows: &[],
            };
            let split = RowGroup::split(&input, n, row_work);
            let rows: Vec<_> = split.iter().map(|g| g.rows.clone()).collect();
            let pieces: Vec<usize> = split.iter().map(|g| g.seqs.len()).collect();
            (rows, pieces)
        };
        let prompt = |len| SeqAttn {
            block_table: &table,
            context_len: len,
            query_start: 0,
            query_len: len,
        };
        // 500 prompt rows, row r's work 500 + r + 1: the first k rows' work, 501k + k(k-1)/2,
        // first reaches half of all (375,250) at k = 291.
        let (rows, pieces) = groups(&[prompt(500)], 500, 2, 500);
        assert_eq!(rows, [0..291, 291..500]);
        assert_eq!(pieces, [1, 1]);
        // 16 decode rows at one context: 8 and 8, each sequence whole in one group.
        let decode: Vec<SeqAttn> = (0..16)
            .map(|i| SeqAttn {
                block_table: &table,
                context_len: 200,
                query_start: i,
                query_len: 1,
            })
            .collect();
        let (rows, pieces) = groups(&decode, 16, 2, 600);
        assert_eq!(rows, [0..8, 8..16]);
        assert_eq!(pieces, [8, 8]);
        // More groups than rows: one group per row, none empty.
        assert_eq!(groups(&decode[..3], 3, 8, 600).0, [0..1, 1..2, 2..3]);
    }

    /// In row groups (a big step runs one per thread), a step's logits and K/V writes are
    /// those of the one-group run bit for bit, also where a prefill chunk is cut between
    /// groups (its later piece attends to the earlier piece's K/V).
    #[test]
    fn row_groups_compute_what_one_group_does() {
        let Some(m) = smollm() else { return };
        let [a, b, c, _] = mixed_prompts(m);
        let block_size = 4;
        let blocks = shuffled_blocks(48, 7);
        let tables: Vec<&[u32]> = blocks.chunks(16).collect();
        let layout = m.model.kv_layout(48, block_size);
        let history = Part {
            tokens: &c,
            start: 0,
            block_table: tables[2],
            all_logits: false,
        };
        let next = [5u32];
        let parts = [
            Part {
                tokens: &a,
                start: 0,
                block_table: tables[0],
                all_logits: true,
            },
            Part {
                tokens: &b,
                start: 0,
                block_table: tables[1],
                all_logits: false,
            },
            Part {
                tokens: &next,
                start: c.len(),
                block_table: tables[2],
                all_logits: false,
            },
        ];
        let run = |groups: usize| {
            let mut cache = CpuKvCache::new(layout, KvDtype::F32);
            step(&m.model, &mut cache, std::slice::from_ref(&history)).unwrap();
            let logits = step_in_groups(&m.model, &mut cache, &parts, Some(groups)).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let kv: Vec<Vec<u32>> = (0..layout.num_layers)
                .flat_map(|i| match cache.layer_mut(i) {
                    kernels::KvLayerMut::F32(k, v) => [bits(k), bits(v)],
                    _ => unreachable!("an f32 cache"),
                })
                .collect();
            (logits.iter().map(|l| bits(l)).collect::<Vec<_>>(), kv)
        };
        let one = run(1);
        assert_eq!(one.0.len(), a.len() + 2);
        for groups in [2, 3, 5] {
            let split = run(groups);
            assert!(split.0 == one.0, "logits differ with {groups} groups");
            assert!(split.1 == one.1, "K/V differ with {groups} groups");
        }
    }

    /// The default GGUF's Q4_1 projections and Q8_0 (tied) LM head run on the kernels' matmul,
    /// equal to candle's `QMatMul` on the file's own tensors up to float rounding (same
    /// quantization and integer sums); F16 weights stay on candle's f32 matmul.
    #[test]
    fn gguf_matmuls_use_the_kernel_and_match_candle() {
        let (Some(m), Some(f16)) = (smollm(), smollm_f16()) else {
            return;
        };
        let kernel = |w: &Matmul| matches!(w, Matmul::Kernel(_));
        let layer = &m.model.layers[0];
        assert!([&layer.q.weight, &layer.o.weight, &layer.gate, &layer.down]
            .into_iter()
            .all(kernel));
        assert!(kernel(&m.model.lm_head));
        assert!(!kernel(&f16.model.layers[0].up) && !kernel(&f16.model.lm_head));

        let mut file = std::fs::File::open(gguf_path()).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        for name in ["blk.3.ffn_down.weight", "token_embd.weight"] {
            let q = std::sync::Arc::new(ct.tensor(&mut file, name, &Device::Cpu).unwrap());
            let k = q.shape().dims()[1];
            let x = Tensor::randn(0f32, 3.0, (16, k), &Device::Cpu).unwrap();
            let candle = QMatMul::QTensor(q.clone());
            let theirs = candle.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let mut ours = vec![];
            let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let w = Matmul::new(QMatMul::QTensor(q)).unwrap();
            Matmul::run_all([&w], &x, [&mut ours]).unwrap();
            let scale = theirs.iter().flatten().fold(1f32, |a, v| a.max(v.abs()));
            assert_eq!(ours.len(), theirs.iter().flatten().count());
            for (a, b) in ours.iter().zip(theirs.iter().flatten()) {
                assert!((a - b).abs() <= 1e-5 * scale, "{name}: {a} vs candle {b}");
            }
        }
    }

    /// Greedy continuation of `prompt` until EOS (at most 32 tokens), decoded, with the KV
    /// cache stored as `dtype`; and the first step's logits.
    fn greedy_run(m: &LoadedModel, prompt: &[u32], dtype: KvDtype) -> (String, Vec<f32>) {
        let mut tokens = prompt.to_vec();
        let mut cache = CpuKvCache::new(m.model.kv_layout(16, 16), dtype);
        let table: Vec<u32> = (0..16).collect();
        let part = Part {
            tokens: &tokens,
            start: 0,
            block_table: &table,
            all_logits: false,
        };
        let mut logits = step(&m.model, &mut cache, &[part]).unwrap();
        let first = logits[0].clone();
        for _ in 0..32 {
            let next = argmax(&logits[0]);
            if m.tokenizer.eos_token_ids().contains(&next) {
                break;
            }
            tokens.push(next);
            let part = Part {
                tokens: &[next],
                start: tokens.len() - 1,
                block_table: &table,
                all_logits: false,
            };
            logits = step(&m.model, &mut cache, &[part]).unwrap();
        }
        (m.tokenizer.decode(&tokens[prompt.len()..], true), first)
    }

    fn greedy_text(m: &LoadedModel, prompt: &[u32]) -> String {
        greedy_run(m, prompt, KvDtype::F32).0
    }

    /// The agent's default 16-bit KV storage (and bf16) keep the answer; the first step's
    /// logits move by the rounding of K and V only (f32 matmuls, so nothing else differs).
    #[test]
    fn sixteen_bit_kv_cache_keeps_the_answer() {
        let Some(m) = smollm_f16() else { return };
        let prompt = chatml(m, "What is the capital of France?");
        let (_, exact) = greedy_run(m, &prompt, KvDtype::F32);
        for (dtype, tolerance) in [(KvDtype::F16, 0.05), (KvDtype::Bf16, 0.3)] {
            let (text, logits) = greedy_run(m, &prompt, dtype);
            assert_eq!(text, "The capital of France is Paris.", "{dtype:?}");
            let diff = max_abs_diff(&logits, &exact);
            eprintln!("{dtype:?}: first-step max |logit diff| {diff}");
            assert!(diff > 0.0 && diff < tolerance, "{dtype:?}: {diff}");
        }
    }

    /// The template's prompt (with SmolLM's default system prompt) on f32 matmuls, like the
    /// f32 numpy/transformers references.
    #[test]
    fn greedy_answers_france_on_dequantized_weights() {
        let Some(m) = smollm_f16() else { return };
        let prompt = chatml(m, "What is the capital of France?");
        assert_eq!(greedy_text(m, &prompt), "The capital of France is Paris.");
    }

    /// On Q4_1 the templated prompt starts "L'Étoile, la Cité, ..." (so does quantized_llama:
    /// "The" and "L" are 0.08 apart even in f32, and activation rounding flips them); the
    /// ChatML prompt without a system turn answers as in model.md.
    #[test]
    fn greedy_answers_france_on_q4_1() {
        let Some(m) = smollm() else { return };
        let text =
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
        let prompt = m.tokenizer.encode(text, false).unwrap();
        assert_eq!(greedy_text(m, &prompt), "The capital of France is Paris.");
    }

    /// A prefill chunk that asks for no logits still fills the cache: chunked prefill ends
    /// with the logits of a one-shot prefill (f32 matmuls, so only attention order differs).
    #[test]
    fn chunked_prefill_matches_one_shot() {
        let Some(m) = smollm_f16() else { return };
        let prompt = chatml(m, "Name three colours.");
        let table = shuffled_blocks(8, 3);
        let one_shot = prefill_logits(m, &[&prompt], &table);
        let (a, b) = prompt.split_at(prompt.len() / 2);
        let chunked = prefill_logits(m, &[a, b], &table);
        let diff = max_abs_diff(&one_shot, &chunked);
        assert!(diff < 1e-3, "chunked prefill differs by {diff}");
    }

    /// Prefills `chunks` one step each, asking for logits only on the last; returns those.
    fn prefill_logits(m: &LoadedModel, chunks: &[&[u32]], table: &[u32]) -> Vec<f32> {
        let mut cache = CpuKvCache::new(m.model.kv_layout(8, 16), KvDtype::F32);
        let mut start = 0;
        let mut last = vec![];
        for (i, chunk) in chunks.iter().enumerate() {
            let positions: Vec<usize> = (start..start + chunk.len()).collect();
            let slots: Vec<usize> = positions
                .iter()
                .map(|&p| table[p / 16] as usize * 16 + p % 16)
                .collect();
            let seqs = [SeqAttn {
                block_table: table,
                context_len: start + chunk.len(),
                query_start: 0,
                query_len: chunk.len(),
            }];
            let final_chunk = i + 1 == chunks.len();
            let rows = if final_chunk {
                vec![chunk.len() - 1]
            } else {
                vec![]
            };
            let input = StepInput {
                token_ids: chunk,
                positions: &positions,
                slots: &slots,
                seqs: &seqs,
                logits_rows: &rows,
                hidden_rows: &[],
            };
            let mut logits = Logits::default();
            m.model.forward(&input, &mut cache, &mut logits).unwrap();
            assert_eq!(logits.rows(), rows.len());
            last = logits
                .iter()
                .last()
                .map(<[f32]>::to_vec)
                .unwrap_or_default();
            start += chunk.len();
        }
        last
    }

    #[test]
    fn rejects_out_of_range_input() {
        let Some(m) = smollm() else { return };
        let mut cache = CpuKvCache::new(m.model.kv_layout(4, 16), KvDtype::F32);
        let table = [0u32, 1];
        let cases: [(&[u32], usize, &[u32]); 3] = [
            (&[49152], 0, &table),   // token id outside the vocabulary
            (&[5], 8192, &[0; 513]), // position past the rope tables
            (&[5], 0, &[7]),         // block outside the cache
        ];
        for (tokens, start, block_table) in cases {
            let err = step(
                &m.model,
                &mut cache,
                &[Part {
                    tokens,
                    start,
                    block_table,
                    all_logits: false,
                }],
            );
            assert!(matches!(err, Err(ModelError::InvalidInput(_))), "{err:?}");
        }
        let wrong_layout = KvLayout {
            num_kv_heads: 9,
            ..m.model.kv_layout(4, 16)
        };
        let err = step(
            &m.model,
            &mut CpuKvCache::new(wrong_layout, KvDtype::F32),
            &[Part {
                tokens: &[5],
                start: 0,
                block_table: &table,
                all_logits: false,
            }],
        );
        assert!(matches!(err, Err(ModelError::InvalidInput(_))), "{err:?}");
    }
}
