//! Multi-threaded CPU paged attention: the CPU backend's kernel and the reference every other
//! backend is checked against.
//!
//! Work is split into items of one query row × a run of KV heads (all of them when the batch
//! has rows enough to keep every thread busy, else one); an item computes all query heads of
//! those KV heads' GQA groups, so each cached K/V row is read once per group rather than once
//! per query head, and a block's regions of all the item's KV heads, which lie side by side,
//! are read as one run (scattered 2 KiB regions stream far slower than 6 KiB ones). Items run
//! on the kernels' pool and write disjoint chunks of `out`.

use std::ops::Range;

use wide::f32x8;

use super::{PagedAttention, SeqAttn};
use crate::kv_layout::{KvElem, KvLayout};
use crate::pool;

/// CPU implementation of [`PagedAttention`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuPagedAttention;

impl PagedAttention for CpuPagedAttention {
    fn write_kv<E: KvElem>(
        &self,
        layout: &KvLayout,
        k_cache: &mut [E],
        v_cache: &mut [E],
        slots: &[usize],
        k: &[f32],
        v: &[f32],
    ) {
        let stride = layout.token_stride();
        debug_assert_eq!(
            k.len(),
            slots.len() * stride,
            "k is not [slots, kv_heads, head_dim]"
        );
        debug_assert_eq!(
            v.len(),
            slots.len() * stride,
            "v is not [slots, kv_heads, head_dim]"
        );
        debug_assert_eq!(k_cache.len(), layout.layer_len());
        debug_assert_eq!(v_cache.len(), layout.layer_len());
        // A few KiB per token: a plain copy loop is far cheaper than spreading it over threads.
        let (hd, bs) = (layout.head_dim, layout.block_size);
        for ((&slot, k_row), v_row) in slots
            .iter()
            .zip(k.chunks_exact(stride))
            .zip(v.chunks_exact(stride))
        {
            let (block, offset) = (slot / bs, slot % bs);
            for (h, (k_head, v_head)) in k_row
                .chunks_exact(hd)
                .zip(v_row.chunks_exact(hd))
                .enumerate()
            {
                let region = layout.head_region(block, h);
                for (dst, &x) in v_cache[region + offset * hd..][..hd].iter_mut().zip(v_head) {
                    *dst = E::from_f32(x);
                }
                // K is dim-major: this token's dims lie `block_size` apart.
                for (dst, &x) in k_cache[region + offset..]
                    .iter_mut()
                    .step_by(bs)
                    .zip(k_head)
                {
                    *dst = E::from_f32(x);
                }
            }
        }
    }

    /// Rows of `out` that belong to no sequence in `seqs` are left untouched.
    fn attend<E: KvElem>(
        &self,
        layout: &KvLayout,
        k_cache: &[E],
        v_cache: &[E],
        q: &[f32],
        num_heads: usize,
        seqs: &[SeqAttn<'_>],
        scale: f32,
        out: &mut [f32],
    ) {
        let head_dim = layout.head_dim;
        let num_kv_heads = layout.num_kv_heads;
        debug_assert!(
            num_kv_heads > 0 && num_heads.is_multiple_of(num_kv_heads),
            "num_heads must be a multiple of num_kv_heads"
        );
        debug_assert_eq!(q.len(), out.len());
        debug_assert_eq!(k_cache.len(), layout.layer_len());
        debug_assert_eq!(v_cache.len(), layout.layer_len());
        let group = num_heads / num_kv_heads;
        if group * head_dim == 0 {
            return;
        }
        debug_assert_eq!(
            q.len() % (num_heads * head_dim),
            0,
            "q is not [tokens, heads, head_dim]"
        );
        let rows = q.len() / (num_heads * head_dim);
        let row_seq = row_owners(layout, seqs, rows);
        let item_heads = if rows >= ROWS_PER_THREAD * pool::threads() {
            num_kv_heads
        } else {
            1
        };
        let items_per_row = num_kv_heads / item_heads;
        let item_len = item_heads * group * head_dim;
        let cache = CacheView {
            k: k_cache,
            v: v_cache,
            layout,
            scale,
        };
        let attend_groups = match head_dim {
            32 => CacheView::attend_groups::<32>,
            64 => CacheView::attend_groups::<64>,
            80 => CacheView::attend_groups::<80>,
            96 => CacheView::attend_groups::<96>,
            128 => CacheView::attend_groups::<128>,
            _ => CacheView::attend_groups::<0>,
        };

        // Item `i` is row `i / items_per_row`, KV heads from `(i % items_per_row) · item_heads`;
        // the query heads of consecutive KV heads are contiguous in both `q` and `out`, so one
        // chunk covers all their groups.
        let run_item = |scores: &mut Vec<f32>, (item, out, q): &mut (usize, &mut [f32], &[f32])| {
            let (row, first) = (*item / items_per_row, *item % items_per_row * item_heads);
            if let Some(seq) = row_seq[row] {
                let attended = seq.context_len - seq.query_len + (row - seq.query_start) + 1;
                let heads = first..first + item_heads;
                attend_groups(
                    &cache,
                    seq.block_table,
                    attended,
                    heads,
                    group,
                    q,
                    scores,
                    out,
                );
            }
        };
        let mut items: Vec<(usize, &mut [f32], &[f32])> = out
            .chunks_mut(item_len)
            .zip(q.chunks(item_len))
            .enumerate()
            .map(|(i, (out, q))| (i, out, q))
            .collect();
        let work: usize = seqs
            .iter()
            .map(|s| s.query_len * s.context_len)
            .sum::<usize>()
            * num_heads
            * head_dim;
        if work < PARALLEL_MIN_WORK {
            let mut scores = Vec::new();
            items
                .iter_mut()
                .for_each(|item| run_item(&mut scores, item));
        } else {
            pool::for_each_mut(&mut items, |item| {
                SCORES.with_borrow_mut(|scores| run_item(scores, item))
            });
        }
    }
}

thread_local! {
    /// Each pool thread's score scratch, kept across calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows per thread from which an item takes all KV heads of its row: fewer rows are split per
/// KV head too, so that a single decode row still spreads over the threads.
const ROWS_PER_THREAD: usize = 2;

/// Below this much work (query tokens × attended positions × heads × head_dim, an upper bound of
/// the multiply-adds of QKᵀ) a call runs on the calling thread: a fork would cost more than it
/// saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// For each token row, the sequence it belongs to (checking, in debug builds, that the
/// sequences' rows are disjoint and their block tables long enough).
fn row_owners<'s, 'a>(
    layout: &KvLayout,
    seqs: &'s [SeqAttn<'a>],
    num_tokens: usize,
) -> Vec<Option<&'s SeqAttn<'a>>> {
    let mut owners = vec![None; num_tokens];
    for seq in seqs {
        debug_assert!(seq.query_len <= seq.context_len, "query_len > context_len");
        debug_assert!(
            seq.block_table.len() * layout.block_size >= seq.context_len,
            "block table too short for context_len"
        );
        for owner in &mut owners[seq.query_start..seq.query_start + seq.query_len] {
            debug_assert!(owner.is_none(), "sequences share a query row");
            *owner = Some(seq);
        }
    }
    owners
}

/// One layer's K/V cache as seen by the attention kernel.
struct CacheView<'a, E> {
    k: &'a [E],
    v: &'a [E],
    layout: &'a KvLayout,
    scale: f32,
}

impl<E: KvElem> CacheView<'_, E> {
    /// Calls `f(first, h, region, next, count)` for each block holding the first `len`
    /// positions of a sequence and each of `kv_heads` (`h` counts from 0 within them): positions
    /// `first .. first + count`, whose KV head data in `data` (the K or V array) is `region` (see
    /// [`KvLayout::head_region`]).
    ///
    /// Regions are scattered and hardware prefetchers stop at pages, so each region would start
    /// with a stall unless prefetched. Items of one KV head read 2 KiB regions: the next one is
    /// prefetched whole before each, which gives it the longest lead. Items of several heads read
    /// a block's regions one after another (6 KiB for 3 heads); a burst of that many lines stalls
    /// on the core's few outstanding-miss slots, so `next` is then the same head's region of the
    /// next block, for `f` to prefetch alongside its reads (see [`prefetch_alongside`]); the
    /// attention bench at 16 rows ran 9-17% faster so than with whole-block bursts.
    #[inline(always)]
    fn for_each_block<'d>(
        &self,
        data: &'d [E],
        block_table: &[u32],
        len: usize,
        kv_heads: Range<usize>,
        mut f: impl FnMut(usize, usize, &'d [E], Option<&'d [E]>, usize),
    ) {
        let block_size = self.layout.block_size;
        let region = |block: u32, kv_head: usize| {
            &data[self.layout.head_region(block as usize, kv_head)..]
                [..block_size * self.layout.head_dim]
        };
        let blocks = &block_table[..len.div_ceil(block_size)];
        let alongside = kv_heads.len() > 1;
        for (b, &block) in blocks.iter().enumerate() {
            let first = b * block_size;
            for (h, kv_head) in kv_heads.clone().enumerate() {
                let next = blocks.get(b + 1).map(|&next| region(next, kv_head));
                if !alongside {
                    prefetch_alongside(next, 0..block_size * self.layout.head_dim);
                }
                f(
                    first,
                    h,
                    region(block, kv_head),
                    next.filter(|_| alongside),
                    block_size.min(len - first),
                );
            }
        }
    }

    /// Attention of the query heads in `q` (`[kv_heads.len() · group, head_dim]`, each run of
    /// `group` heads reading one of `kv_heads`) over the first `len` cached positions of a
    /// sequence, written to `out` (same shape as `q`). `scores` is scratch space reused across
    /// calls. `HD` is the head dimension when it is known at compile time (vector loops then
    /// unroll fully and the accumulators stay in registers), 0 otherwise. Heads of a group go
    /// [`JOINT_HEADS`] at a time, so each K/V vector is loaded (and widened from 16 bits) once
    /// for all of them.
    #[allow(clippy::too_many_arguments)]
    fn attend_groups<const HD: usize>(
        &self,
        block_table: &[u32],
        len: usize,
        kv_heads: Range<usize>,
        group: usize,
        q: &[f32],
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let head_dim = if HD == 0 { self.layout.head_dim } else { HD };
        let bs = self.layout.block_size;
        let heads = q.len() / head_dim;
        // Scores are `[heads, padded_len]`: each head's row is a whole number of vectors and,
        // where blocks are, of blocks, so score tiles are written whole; the padding ends up
        // -inf, whose softmax weight is exactly 0.
        let padded_len = if bs.is_multiple_of(LANES) {
            len.next_multiple_of(bs)
        } else {
            len.next_multiple_of(LANES)
        };
        scores.clear();
        scores.resize(heads * padded_len, 0.0);
        // The query heads of the `h`-th KV head, JOINT_HEADS at a time.
        let chunks = |h: usize| {
            (h * group..(h + 1) * group)
                .step_by(JOINT_HEADS)
                .map(move |c| c..(c + JOINT_HEADS).min((h + 1) * group))
        };

        let scale = self.scale;
        let kv = kv_heads.clone();
        self.for_each_block(self.k, block_table, len, kv, |first, h, k, next, count| {
            for (c, heads) in chunks(h).enumerate() {
                let q = &q[heads.start * head_dim..heads.end * head_dim];
                let scores = &mut scores[heads.start * padded_len..heads.end * padded_len];
                let tile = QkTile {
                    k,
                    // The group's other chunks read the same region.
                    next: next.filter(|_| c == 0),
                    bs,
                    q,
                    head_dim,
                    scale,
                };
                match heads.len() {
                    1 => tile.scores::<1, 4, HD>(count, scores, padded_len, first),
                    2 => tile.scores::<2, 2, HD>(count, scores, padded_len, first),
                    _ => tile.scores::<3, 2, HD>(count, scores, padded_len, first),
                }
            }
        });

        for head_scores in scores.chunks_exact_mut(padded_len) {
            head_scores[len..].fill(f32::NEG_INFINITY);
            softmax_in_place(head_scores.as_chunks_mut::<LANES>().0);
        }

        out.fill(0.0);
        self.for_each_block(
            self.v,
            block_table,
            len,
            kv_heads,
            |first, h, v, next, count| {
                for (c, heads) in chunks(h).enumerate() {
                    let next = next.filter(|_| c == 0);
                    let out = &mut out[heads.start * head_dim..heads.end * head_dim];
                    let weights =
                        |h: usize| &scores[(heads.start + h) * padded_len + first..][..count];
                    let region = VRegion { v, next, head_dim };
                    match heads.len() {
                        2 => weighted_v_heads::<2, HD, E>(region, [weights(0), weights(1)], out),
                        3 => weighted_v_heads::<3, HD, E>(
                            region,
                            [weights(0), weights(1), weights(2)],
                            out,
                        ),
                        n => weighted_v_each::<HD, E>(region, (0..n).map(weights), out),
                    }
                }
            },
        );
    }
}

/// Query heads of one GQA group computed together (see [`CacheView::attend_groups`]): 3 heads'
/// accumulators (12 score vectors, or 12 V vectors) plus the shared loads fit the 16 AVX
/// registers.
const JOINT_HEADS: usize = 3;

/// Scores of some query heads against one block's dim-major K region.
struct QkTile<'a, E> {
    /// `[head_dim][block_size]`.
    k: &'a [E],
    /// The next block's region of the same head, prefetched alongside `k`.
    next: Option<&'a [E]>,
    bs: usize,
    /// The heads' queries, `[heads, head_dim]`.
    q: &'a [f32],
    head_dim: usize,
    scale: f32,
}

impl<E: KvElem> QkTile<'_, E> {
    /// Writes the scaled scores of the block's first `count` positions for the `H` heads to
    /// `scores[h · padded_len + first ..]`. `P` partial sums per score vector hide the FMA
    /// latency (fewer are needed the more heads share a load).
    #[inline(always)]
    fn scores<const H: usize, const P: usize, const HD: usize>(
        &self,
        count: usize,
        scores: &mut [f32],
        padded_len: usize,
        first: usize,
    ) {
        let bs = self.bs;
        // Tiles may read past `count` within the block (stale slots): those lanes are
        // overwritten with -inf by the caller.
        if bs.is_multiple_of(2 * LANES) {
            self.tiles::<2, H, P, HD>(count, scores, padded_len, first);
        } else if bs.is_multiple_of(LANES) {
            self.tiles::<1, H, P, HD>(count, scores, padded_len, first);
        } else {
            prefetch_alongside(self.next, 0..self.k.len());
            let head_dim = self.head_dim;
            for (h, q) in self.q.chunks_exact(head_dim).enumerate() {
                let row = &mut scores[h * padded_len + first..][..count];
                for (t, s) in row.iter_mut().enumerate() {
                    let dot: f32 = q
                        .iter()
                        .enumerate()
                        .map(|(d, &x)| x * self.k[d * bs + t].to_f32())
                        .sum();
                    *s = dot * self.scale;
                }
            }
        }
    }

    /// [`Self::scores`] in tiles of `N·8` positions (`block_size` a multiple of that).
    #[inline(always)]
    fn tiles<const N: usize, const H: usize, const P: usize, const HD: usize>(
        &self,
        count: usize,
        scores: &mut [f32],
        padded_len: usize,
        first: usize,
    ) {
        for t0 in (0..count).step_by(N * LANES) {
            for (h, tile) in self.tile::<N, H, P, HD>(t0).iter().enumerate() {
                store(&mut scores[h * padded_len + first + t0..], tile);
            }
        }
    }

    /// Scaled scores `q_h · k[t] · scale` of positions `t0 .. t0 + N·8` for the `H` heads
    /// (`t0 + N·8 <= block_size`): per query dim, one load of 8·N positions, then one broadcast
    /// of each head's query dim times it, so no horizontal sums. The loop reads through raw
    /// pointers after one bounds check: with per-step slice checks and span arithmetic it ran
    /// about twice the instructions and spilled registers (attention bench, 16 rows: 10-20%
    /// slower).
    #[inline(always)]
    fn tile<const N: usize, const H: usize, const P: usize, const HD: usize>(
        &self,
        t0: usize,
    ) -> [[f32x8; N]; H] {
        let head_dim = if HD == 0 { self.head_dim } else { HD };
        let bs = self.bs;
        assert!(
            self.q.len() >= H * head_dim && self.k.len() >= head_dim * bs && t0 + N * LANES <= bs
        );
        let (k, q) = (self.k.as_ptr(), self.q.as_ptr());
        let next = self
            .next
            .filter(|next| next.len() >= head_dim * bs)
            .map(<[E]>::as_ptr);
        let mut acc = [[[f32x8::ZERO; N]; H]; P];
        let step = |acc: &mut [[f32x8; N]; H], d: usize| {
            let at = d * bs + t0;
            // SAFETY: `d < head_dim`, so `at + N·8 <= head_dim · bs`, within `k` and `next`, and
            // `h · head_dim + d` within `q` (all checked above).
            unsafe {
                if let Some(next) = next {
                    prefetch(next.add(at));
                }
                let kv: [f32x8; N] =
                    std::array::from_fn(|n| E::load8(&*k.add(at + n * LANES).cast::<[E; LANES]>()));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let x = f32x8::splat(*q.add(h * head_dim + d));
                    for (a, k) in acc.iter_mut().zip(&kv) {
                        *a = k.mul_add(x, *a);
                    }
                }
            }
        };
        // Dims in groups of P, so the accumulator of each dim is known at compile time (the
        // array then lives in registers, not on the stack).
        let groups = head_dim / P;
        for g in 0..groups {
            for (p, acc) in acc.iter_mut().enumerate() {
                step(acc, g * P + p);
            }
        }
        for d in groups * P..head_dim {
            step(&mut acc[0], d);
        }
        let scale = f32x8::splat(self.scale);
        std::array::from_fn(|h| {
            std::array::from_fn(|n| {
                acc.iter().map(|a| a[h][n]).fold(f32x8::ZERO, |s, a| s + a) * scale
            })
        })
    }
}

/// One block's token-major V region of one KV head (`[block_size, head_dim]`), and the next
/// region, to prefetch alongside the reads.
#[derive(Clone, Copy)]
struct VRegion<'a, E> {
    v: &'a [E],
    next: Option<&'a [E]>,
    head_dim: usize,
}

impl<E> VRegion<'_, E> {
    /// The head dimension: `HD` where known at compile time (non-zero), so loops unroll.
    #[inline(always)]
    fn dim<const HD: usize>(&self) -> usize {
        if HD == 0 {
            self.head_dim
        } else {
            HD
        }
    }
}

/// `out += Σ_t weights[t] · v[t]` over one block's token-major V region (`[block_size,
/// head_dim]`) for one head, up to [`ACC_VECTORS`] vectors of the head at a time, in a local
/// array the compiler keeps in registers when `HD` is known.
#[inline(always)]
fn weighted_v<const HD: usize, E: KvElem>(
    region: VRegion<'_, E>,
    weights: &[f32],
    out: &mut [f32],
) {
    let (v, next, head_dim) = (region.v, region.next, region.dim::<HD>());
    for (piece, out_piece) in out[..head_dim].chunks_mut(ACC_LEN).enumerate() {
        let offset = piece * ACC_LEN;
        let mut acc = [f32x8::ZERO; ACC_VECTORS];
        let mut tail_acc = [0.0f32; LANES];
        for (t, &w) in weights.iter().enumerate() {
            let span = offset + t * head_dim..offset + t * head_dim + out_piece.len();
            prefetch_alongside(next, span.clone());
            let (vectors, tail) = v[span].as_chunks::<LANES>();
            let w_splat = f32x8::splat(w);
            for (a, v) in acc.iter_mut().zip(vectors) {
                *a = E::load8(v).mul_add(w_splat, *a);
            }
            for (a, v) in tail_acc.iter_mut().zip(tail) {
                *a += w * v.to_f32();
            }
        }
        let (out_vectors, out_tail) = out_piece.as_chunks_mut::<LANES>();
        for (o, a) in out_vectors.iter_mut().zip(acc) {
            *o = (f32x8::new(*o) + a).to_array();
        }
        for (o, a) in out_tail.iter_mut().zip(tail_acc) {
            *o += a;
        }
    }
}

/// [`weighted_v`] for the `H` heads of a chunk (`out` is `[H, head_dim]`): jointly where the
/// head dimension is a multiple of 2 or 4 vectors, else one head at a time.
#[inline(always)]
fn weighted_v_heads<const H: usize, const HD: usize, E: KvElem>(
    region: VRegion<'_, E>,
    weights: [&[f32]; H],
    out: &mut [f32],
) {
    let head_dim = region.dim::<HD>();
    if head_dim.is_multiple_of(4 * LANES) {
        weighted_v_joint::<H, 4, HD, E>(region, weights, out);
    } else if head_dim.is_multiple_of(2 * LANES) {
        weighted_v_joint::<H, 2, HD, E>(region, weights, out);
    } else {
        weighted_v_each::<HD, E>(region, weights.into_iter(), out);
    }
}

/// [`weighted_v`] for each head of a chunk in turn (`out` is `[heads, head_dim]`); the first
/// prefetches the next region.
#[inline(always)]
fn weighted_v_each<'w, const HD: usize, E: KvElem>(
    region: VRegion<'_, E>,
    weights: impl Iterator<Item = &'w [f32]>,
    out: &mut [f32],
) {
    let chunks = out.chunks_exact_mut(region.dim::<HD>());
    for (h, (out, weights)) in chunks.zip(weights).enumerate() {
        let next = region.next.filter(|_| h == 0);
        weighted_v::<HD, E>(VRegion { next, ..region }, weights, out);
    }
}

/// [`weighted_v`] for `H` heads at once (`out` is `[H, head_dim]`, `head_dim` a multiple of
/// `V·8`), `V` vectors of each head per pass over the tokens: each V vector is loaded once and
/// multiplied by every head's weight. With `V = 4` the 12 accumulators of 3 heads are
/// independent enough to keep both FMA pipes busy (2 vectors left the pass bound by FMA latency:
/// attention bench, 16 rows, 20-30% slower), and raw pointers keep the loop free of bounds
/// checks.
#[inline(always)]
fn weighted_v_joint<const H: usize, const V: usize, const HD: usize, E: KvElem>(
    region: VRegion<'_, E>,
    weights: [&[f32]; H],
    out: &mut [f32],
) {
    let (v, next, head_dim) = (region.v, region.next, region.dim::<HD>());
    let count = weights[0].len();
    assert!(
        v.len() >= count * head_dim
            && out.len() >= H * head_dim
            && head_dim.is_multiple_of(V * LANES)
            && weights.iter().all(|w| w.len() >= count)
    );
    let next = next
        .filter(|next| next.len() >= count * head_dim)
        .map(<[E]>::as_ptr);
    let (vp, wp) = (v.as_ptr(), weights.map(<[f32]>::as_ptr));
    for piece in (0..head_dim).step_by(V * LANES) {
        let mut acc = [[f32x8::ZERO; V]; H];
        for t in 0..count {
            let at = t * head_dim + piece;
            // SAFETY: `t < count` and `piece + V·8 <= head_dim`, so every read is within `v`,
            // `next` and the weights (checked above).
            unsafe {
                if let Some(next) = next {
                    prefetch(next.add(at));
                }
                let w: [f32x8; H] = std::array::from_fn(|h| f32x8::splat(*wp[h].add(t)));
                for n in 0..V {
                    let x = E::load8(&*vp.add(at + n * LANES).cast::<[E; LANES]>());
                    for (acc, w) in acc.iter_mut().zip(&w) {
                        acc[n] = x.mul_add(*w, acc[n]);
                    }
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let (out, _) = out[h * head_dim + piece..][..V * LANES].as_chunks_mut::<LANES>();
            for (o, a) in out.iter_mut().zip(acc) {
                *o = (f32x8::new(*o) + *a).to_array();
            }
        }
    }
}

/// Hints the cache to load the line holding `p`.
#[inline(always)]
fn prefetch<E>(p: *const E) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache; it never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Starts loading the lines of `next` that begin (counting 64-byte lines from its start)
/// within `span`. Called with each span of the current region a kernel reads, it prefetches
/// each line of the next region once, spread over the kernel's own work.
#[inline(always)]
fn prefetch_alongside<E>(next: Option<&[E]>, span: Range<usize>) {
    let Some(next) = next else { return };
    let per_line = 64 / std::mem::size_of::<E>();
    let end = span.end.min(next.len());
    let mut i = span.start.next_multiple_of(per_line);
    while i < end {
        prefetch(next.as_ptr().wrapping_add(i));
        i += per_line;
    }
}

/// f32 lanes of one SIMD vector (AVX: 8).
const LANES: usize = 8;
/// Output vectors accumulated at once per head (32 vectors: 256 floats).
const ACC_VECTORS: usize = 32;
const ACC_LEN: usize = ACC_VECTORS * LANES;

/// Writes the vectors of `tile` to the start of `dst`.
#[inline(always)]
fn store<const N: usize>(dst: &mut [f32], tile: &[f32x8; N]) {
    for (d, v) in dst.as_chunks_mut::<LANES>().0.iter_mut().zip(tile) {
        *d = v.to_array();
    }
}

/// Numerically stable softmax over whole vectors: exponentials of `x - max`, so none overflows.
fn softmax_in_place(x: &mut [[f32; LANES]]) {
    let max = x
        .iter()
        .fold(f32x8::splat(f32::NEG_INFINITY), |m, v| {
            m.max(f32x8::new(*v))
        })
        .to_array()
        .into_iter()
        .fold(f32::NEG_INFINITY, f32::max);
    let max = f32x8::splat(max);
    let mut sum = f32x8::ZERO;
    for v in x.iter_mut() {
        let e = (f32x8::new(*v) - max).exp();
        sum += e;
        *v = e.to_array();
    }
    let inv = f32x8::splat(1.0 / sum.reduce_add());
    for v in x.iter_mut() {
        *v = (f32x8::new(*v) * inv).to_array();
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    use super::*;

    const TOLERANCE: f32 = 1e-5;

    fn random_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// One sequence of a test batch: its full K/V history and how many of its last tokens are
    /// this step's queries.
    struct TestSeq {
        context_len: usize,
        query_len: usize,
        /// Dense `[context_len, num_kv_heads, head_dim]`.
        k: Vec<f32>,
        v: Vec<f32>,
        block_table: Vec<u32>,
    }

    impl TestSeq {
        fn slot(&self, layout: &KvLayout, p: usize) -> usize {
            self.block_table[p / layout.block_size] as usize * layout.block_size
                + p % layout.block_size
        }
    }

    /// Dense attention with an explicit causal mask, in f64: the oracle.
    fn reference(
        layout: &KvLayout,
        num_heads: usize,
        seq: &TestSeq,
        q: &[f32],
        scale: f32,
    ) -> Vec<f32> {
        let (hd, nkv) = (layout.head_dim, layout.num_kv_heads);
        let group = num_heads / nkv;
        let mut out = vec![0.0f32; seq.query_len * num_heads * hd];
        for i in 0..seq.query_len {
            let pos = seq.context_len - seq.query_len + i;
            for h in 0..num_heads {
                let kvh = h / group;
                let qv = &q[(i * num_heads + h) * hd..][..hd];
                let scores: Vec<f64> = (0..seq.context_len)
                    .map(|j| {
                        if j > pos {
                            f64::NEG_INFINITY
                        } else {
                            let kv = &seq.k[(j * nkv + kvh) * hd..][..hd];
                            qv.iter()
                                .zip(kv)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale as f64
                        }
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..hd {
                    let acc: f64 = (0..seq.context_len)
                        .map(|j| weights[j] * seq.v[(j * nkv + kvh) * hd + d] as f64)
                        .sum();
                    out[(i * num_heads + h) * hd + d] = (acc / total) as f32;
                }
            }
        }
        out
    }

    /// `values` as the cache stores them in `E` (so the f64 reference sees the stored values).
    fn stored<E: KvElem>(values: Vec<f32>) -> Vec<f32> {
        values
            .into_iter()
            .map(|x| E::from_f32(x).to_f32())
            .collect()
    }

    /// Builds sequences `(context_len, query_len)` with random data, writes their earlier
    /// context per sequence and this step's tokens in one batched `write_kv` (as the engine
    /// does), runs one batched `attend` and checks every sequence against the dense reference.
    /// `shuffle` spreads block tables over random, non-contiguous block ids; `reverse_seqs`
    /// passes the sequences in an order different from their rows.
    fn check<E: KvElem>(
        layout: KvLayout,
        num_heads: usize,
        shapes: &[(usize, usize)],
        shuffle: bool,
        reverse_seqs: bool,
        seed: u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let attn = CpuPagedAttention;
        let (hd, stride) = (layout.head_dim, layout.token_stride());
        let mut block_ids: Vec<u32> = (0..layout.num_blocks as u32).collect();
        if shuffle {
            block_ids.shuffle(&mut rng);
        }
        let mut free = block_ids.into_iter();
        let seqs: Vec<TestSeq> = shapes
            .iter()
            .map(|&(context_len, query_len)| TestSeq {
                context_len,
                query_len,
                k: stored::<E>(random_vec(&mut rng, context_len * stride)),
                v: stored::<E>(random_vec(&mut rng, context_len * stride)),
                block_table: free
                    .by_ref()
                    .take(context_len.div_ceil(layout.block_size))
                    .collect(),
            })
            .collect();
        for seq in &seqs {
            assert_eq!(
                seq.block_table.len(),
                seq.context_len.div_ceil(layout.block_size),
                "test needs more blocks"
            );
        }

        let zeros = || vec![E::from_f32(0.0); layout.layer_len()];
        let (mut k_cache, mut v_cache) = (zeros(), zeros());
        for seq in &seqs {
            let cached = seq.context_len - seq.query_len;
            let slots: Vec<usize> = (0..cached).map(|p| seq.slot(&layout, p)).collect();
            attn.write_kv(
                &layout,
                &mut k_cache,
                &mut v_cache,
                &slots,
                &seq.k[..cached * stride],
                &seq.v[..cached * stride],
            );
        }
        let (mut slots, mut new_k, mut new_v) = (Vec::new(), Vec::new(), Vec::new());
        for seq in &seqs {
            let cached = seq.context_len - seq.query_len;
            slots.extend((cached..seq.context_len).map(|p| seq.slot(&layout, p)));
            new_k.extend_from_slice(&seq.k[cached * stride..]);
            new_v.extend_from_slice(&seq.v[cached * stride..]);
        }
        attn.write_kv(&layout, &mut k_cache, &mut v_cache, &slots, &new_k, &new_v);

        let num_tokens: usize = shapes.iter().map(|s| s.1).sum();
        let row_len = num_heads * hd;
        let q = random_vec(&mut rng, num_tokens * row_len);
        let mut query_start = 0;
        let mut batch: Vec<SeqAttn<'_>> = seqs
            .iter()
            .map(|seq| {
                let s = SeqAttn {
                    block_table: &seq.block_table,
                    context_len: seq.context_len,
                    query_start,
                    query_len: seq.query_len,
                };
                query_start += seq.query_len;
                s
            })
            .collect();
        if reverse_seqs {
            batch.reverse();
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![f32::NAN; num_tokens * row_len];
        attn.attend(
            &layout, &k_cache, &v_cache, &q, num_heads, &batch, scale, &mut out,
        );

        let mut row = 0;
        for (n, seq) in seqs.iter().enumerate() {
            let rows = row * row_len..(row + seq.query_len) * row_len;
            let expected = reference(&layout, num_heads, seq, &q[rows.clone()], scale);
            for (i, (got, want)) in out[rows].iter().zip(&expected).enumerate() {
                assert!(
                    (got - want).abs() <= TOLERANCE,
                    "seq {n} token {} head {} dim {}: got {got}, want {want}",
                    i / row_len,
                    i % row_len / hd,
                    i % hd
                );
            }
            row += seq.query_len;
        }
    }

    fn layout(
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> KvLayout {
        KvLayout {
            num_layers: 1,
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
        }
    }

    #[test]
    fn prefill_from_empty_cache() {
        check::<f32>(layout(8, 16, 2, 64), 4, &[(50, 50)], false, false, 1);
    }

    #[test]
    fn prefill_chunk_after_cached_blocks_with_shuffled_table() {
        check::<f32>(layout(16, 16, 2, 64), 4, &[(77, 29)], true, false, 2);
    }

    #[test]
    fn batched_decodes_mixed_with_prefill_chunk() {
        // head_dim 44 also exercises the scalar tails after whole SIMD vectors.
        let shapes = [(1, 1), (17, 1), (33, 1), (40, 24), (64, 1), (5, 1)];
        check::<f32>(layout(32, 8, 2, 44), 8, &shapes, true, true, 3);
    }

    #[test]
    fn grouped_query_attention_like_the_default_model() {
        check::<f32>(
            layout(24, 16, 3, 64),
            9,
            &[(37, 37), (53, 1), (70, 19)],
            true,
            false,
            4,
        );
    }

    /// Groups that do not divide into JOINT_HEADS: 7 query heads per KV head go 3 + 3 + 1
    /// (Qwen2-0.5B's shape), 4 go 3 + 1, 5 go 3 + 2; with 8-position tiles.
    #[test]
    fn query_groups_split_into_joint_chunks() {
        let shapes = [(1, 1), (23, 1), (40, 17), (9, 1)];
        check::<half::f16>(layout(32, 8, 2, 32), 14, &shapes, true, true, 15);
        check::<f32>(layout(32, 8, 1, 64), 4, &shapes, true, false, 16);
        check::<half::bf16>(layout(32, 16, 1, 48), 5, &shapes, true, true, 17);
    }

    /// Items of one KV head (a lone decode row, and two rows, with enough work to fork) and of
    /// whole rows (a batch with rows enough for every thread), over the same kind of cache.
    #[test]
    fn items_per_kv_head_and_per_row() {
        let small = layout(64, 16, 3, 64);
        assert!(300 * 9 * 64 >= PARALLEL_MIN_WORK);
        check::<half::f16>(small, 9, &[(300, 1)], true, false, 18);
        check::<half::f16>(small, 9, &[(200, 1), (90, 1)], true, true, 19);
        let batch: Vec<(usize, usize)> = (0..2 * ROWS_PER_THREAD * pool::threads())
            .map(|i| (20 + 13 * i, 1))
            .collect();
        check::<half::f16>(layout(96, 16, 3, 64), 9, &batch, true, true, 20);
    }

    #[test]
    fn head_dim_wider_than_one_accumulator_piece() {
        // 260 = one 256-float piece, then a 4-float piece that is all scalar tail.
        check::<f32>(layout(6, 4, 1, 260), 2, &[(9, 9), (5, 1)], true, false, 7);
    }

    #[test]
    fn small_batch_on_the_calling_thread() {
        // Little enough work to stay below PARALLEL_MIN_WORK.
        let shapes = [(3, 1), (6, 2), (1, 1), (9, 1)];
        let work: usize = shapes.iter().map(|(c, q)| c * q).sum::<usize>() * 4 * 16;
        assert!(work < PARALLEL_MIN_WORK);
        check::<f32>(layout(8, 4, 2, 16), 4, &shapes, true, true, 6);
    }

    /// 16-bit storage: the same kernel over f16 and bf16 caches (block sizes for both vector
    /// tiles and the scalar path), exact against the reference on the stored values.
    #[test]
    fn sixteen_bit_storage() {
        let shapes = [(37, 37), (53, 1), (70, 19)];
        check::<half::f16>(layout(24, 16, 3, 64), 9, &shapes, true, false, 11);
        check::<half::bf16>(layout(24, 16, 3, 64), 9, &shapes, true, true, 12);
        let shapes = [(1, 1), (17, 1), (40, 24), (5, 1)];
        check::<half::f16>(layout(32, 8, 2, 44), 8, &shapes, true, true, 13);
        check::<half::bf16>(layout(64, 4, 2, 16), 4, &shapes, true, false, 14);
    }

    #[test]
    fn write_kv_puts_rows_where_attend_reads_them() {
        let layout = layout(4, 4, 2, 16);
        let stride = layout.token_stride();
        let attn = CpuPagedAttention;
        let mut rng = StdRng::seed_from_u64(5);
        let (mut k_cache, mut v_cache) =
            (vec![0.0; layout.layer_len()], vec![0.0; layout.layer_len()]);
        // Token 0 of a sequence whose block table starts at block 2: slot 8.
        let block_table = [2u32];
        let (k, v) = (random_vec(&mut rng, stride), random_vec(&mut rng, stride));
        attn.write_kv(&layout, &mut k_cache, &mut v_cache, &[8], &k, &v);

        for slot in 0..layout.num_blocks * layout.block_size {
            for h in 0..layout.num_kv_heads {
                for d in 0..layout.head_dim {
                    let (ki, vi) = layout.slot_index(slot, h, d);
                    let i = h * layout.head_dim + d;
                    let want = if slot == 8 { (k[i], v[i]) } else { (0.0, 0.0) };
                    assert_eq!(
                        (k_cache[ki], v_cache[vi]),
                        want,
                        "slot {slot} head {h} dim {d}"
                    );
                }
            }
        }
        // Every element was checked once: the indices cover the arrays.
        let mut seen = vec![0u8; layout.layer_len()];
        for slot in 0..layout.num_blocks * layout.block_size {
            for h in 0..layout.num_kv_heads {
                for d in 0..layout.head_dim {
                    seen[layout.slot_index(slot, h, d).0] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1));

        // With a single attended position the softmax weight is 1: the output is that V row.
        let num_heads = 4;
        let q = random_vec(&mut rng, num_heads * layout.head_dim);
        let mut out = vec![0.0; q.len()];
        let seq = SeqAttn {
            block_table: &block_table,
            context_len: 1,
            query_start: 0,
            query_len: 1,
        };
        attn.attend(
            &layout,
            &k_cache,
            &v_cache,
            &q,
            num_heads,
            &[seq],
            0.25,
            &mut out,
        );
        for (h, out_head) in out.chunks_exact(layout.head_dim).enumerate() {
            let kv_head = h / 2;
            assert_eq!(
                out_head,
                &v[kv_head * layout.head_dim..][..layout.head_dim],
                "head {h}"
            );
        }
    }

    #[test]
    fn rows_outside_every_sequence_are_untouched() {
        let layout = layout(2, 4, 1, 16);
        let attn = CpuPagedAttention;
        let (k_cache, v_cache) = (vec![1.0; layout.layer_len()], vec![1.0; layout.layer_len()]);
        let q = vec![0.5; 3 * layout.head_dim];
        let mut out = vec![7.0; q.len()];
        let seq = SeqAttn {
            block_table: &[1],
            context_len: 2,
            query_start: 1,
            query_len: 1,
        };
        attn.attend(&layout, &k_cache, &v_cache, &q, 1, &[seq], 1.0, &mut out);
        assert!(out[..16].iter().chain(&out[32..]).all(|&x| x == 7.0));
        assert!(out[16..32].iter().all(|&x| (x - 1.0).abs() < 1e-6));
    }
}
