//! Attention on the CPU in tiles that stay in cache, for runs whose matmuls take bf16 operands.
//!
//! `Plan::forward` and `Plan::backward` work a chunk of queries at a time across all batches
//! and heads through candle tensors: at 1024 tokens × 4 a chunk's scores are 16 MiB, and each
//! elementwise step (softmax, its backward, the bf16 rounding of each operand, the copies of a
//! chunk's keys) is another pass over them through memory. Here one task owns one KV head of
//! one sequence (its query heads side by side, as `Plan::grouped` lays them) and walks its
//! queries in tiles of a few hundred KiB of scores, so that a tile's scores, probabilities and
//! their gradients are made and used while they sit in L2. The keys and values a tile sees are
//! contiguous rows of k and v, read in place.
//!
//! The arithmetic is `Plan`'s: the same six products on the bf16 kernel, the softmax of
//! `ops::softmax_row`; only the grouping of the sums that build dk and dv over query tiles
//! differs from the chunked path's.

use rayon::prelude::*;

use super::Plan;
use crate::model::ops::{self, ScoreMask};
use crate::quant::bf16_matmul::{self, Lhs, Rhs};

/// Bytes of f32 scores of one tile. S, P and dP each hold this much, so a backward tile works
/// in about 1.5 MiB, near one core's 1 MiB of L2 and far below L3. (256 KiB to 1 MiB measured within
/// this machine's noise of each other at 1024 tokens × 4; 128 KiB and the 16 MiB chunks of
/// `Plan` were slower.)
pub const TILE_SCORE_BYTES: usize = 512 << 10;

/// One tile: queries `start..start + len` of each query head of a group, seeing keys `lo..hi`.
struct Tile {
    start: usize,
    len: usize,
    lo: usize,
    hi: usize,
}

/// Queries per tile for `group` query heads per KV head and `keys` key positions.
pub(super) fn tile_queries(group: usize, queries: usize, keys: usize) -> usize {
    (TILE_SCORE_BYTES / (4 * group * keys.max(1))).clamp(1, queries.max(1))
}

impl Plan {
    fn tiles(&self) -> impl Iterator<Item = Tile> + '_ {
        let len = self.chunk;
        (0..self.t).step_by(len).map(move |start| {
            let len = len.min(self.t - start);
            let offset = self.mask.offset;
            let hi = offset + start + len;
            let lo = self.mask.window.map_or(0, |w| (offset + start + 1).saturating_sub(w));
            Tile { start, len, lo, hi }
        })
    }

    /// The tile's rows [group · len, d] of x, one KV head's query heads [group, t, d].
    fn tile_rows(&self, x: &[f32], tile: &Tile) -> Vec<f32> {
        let (t, d) = (self.t, self.d);
        (0..self.group()).flat_map(|g| &x[(g * t + tile.start) * d..][..tile.len * d]).copied().collect()
    }

    /// rows[g · len + i] · factor into x's query i of head g (the inverse of `tile_rows`).
    fn put_tile_rows(&self, x: &mut [f32], tile: &Tile, rows: &[f32], factor: f32) {
        let (t, d) = (self.t, self.d);
        for (g, src) in rows.chunks_exact(tile.len * d).enumerate() {
            for (dst, &v) in x[(g * t + tile.start) * d..][..tile.len * d].iter_mut().zip(src) {
                *dst = v * factor;
            }
        }
    }

    /// The tile's probabilities [group · len, hi − lo] (exactly 0 on hidden keys) into `probs`
    /// from rows of q and the keys it sees, for KV head `kv`; `scores` is scratch of that size.
    fn tile_probs(&self, q_rows: &[f32], keys: &[f32], tile: &Tile, kv: usize, scores: &mut [f32], probs: &mut [f32]) {
        let (m, n, d) = (self.group() * tile.len, tile.hi - tile.lo, self.d);
        bf16_matmul::matmul_into(scores, Lhs::Rows(q_rows), m, d, Rhs::TransposedF32(keys), n);
        let mask = ScoreMask {
            scale: self.scale,
            query_start: self.mask.offset + tile.start,
            key_start: tile.lo,
            window: self.mask.window,
            slopes: None,
        };
        // SAFETY: MaybeUninit<f32> has f32's layout; only f32 values are written through it.
        let probs = unsafe { &mut *(probs as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
        for (row, (y, x)) in probs.chunks_mut(n).zip(scores.chunks(n)).enumerate() {
            let (g, i) = (row / tile.len, row % tile.len);
            let (lo, hi) = mask.visible(mask.query_start + i, n);
            let slope = self.mask.alibi.as_ref().map_or(0.0, |s| s[kv * self.group() + g]);
            y[..lo].fill(std::mem::MaybeUninit::new(0.0));
            y[hi..].fill(std::mem::MaybeUninit::new(0.0));
            ops::softmax_row(&x[lo..hi], &mut y[lo..hi], self.scale as f32, slope, (tile.lo + lo) as f32);
        }
    }

    /// Scratch for one task's tiles: the largest tile's scores, probabilities, their gradient
    /// and one product [max(rows, keys), d], reused across the tiles.
    fn tile_scratch(&self) -> [Vec<f32>; 4] {
        let (keys, m) = (self.mask.offset + self.t, self.group() * self.chunk);
        [vec![0f32; m * keys], vec![0f32; m * keys], vec![0f32; m * keys], vec![0f32; m.max(keys) * self.d]]
    }

    /// The output [b, heads, t, d] of contiguous q [b, heads, t, d], k and v [b, kv_heads, keys, d].
    pub(super) fn forward_tiles(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (t, d, keys, group) = (self.t, self.d, self.mask.offset + self.t, self.group());
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(group * t * d).enumerate().for_each(|(task, out)| {
            let kv = task % self.kv_heads;
            let q = &q[task * group * t * d..][..group * t * d];
            let (k, v) = (&k[task * keys * d..][..keys * d], &v[task * keys * d..][..keys * d]);
            let [mut scores, mut probs, _, mut o] = self.tile_scratch();
            for tile in self.tiles() {
                let (m, n) = (group * tile.len, tile.hi - tile.lo);
                let (scores, probs, o) = (&mut scores[..m * n], &mut probs[..m * n], &mut o[..m * d]);
                let q_rows = self.tile_rows(q, &tile);
                self.tile_probs(&q_rows, &k[tile.lo * d..tile.hi * d], &tile, kv, scores, probs);
                bf16_matmul::matmul_into(o, Lhs::Rows(probs), m, n, Rhs::PlainF32(&v[tile.lo * d..tile.hi * d]), d);
                self.put_tile_rows(out, &tile, o, 1.0);
            }
        });
        out
    }

    /// Gradients (dq, dk, dv) of contiguous q, k, v and the output's gradient, recomputing each
    /// tile's probabilities P: dP = dO·vᵀ, dS = P ⊙ (dP − Σ dP ⊙ P), dq = dS·k/√d,
    /// dk = Σ dSᵀ·q/√d, dv = Σ Pᵀ·dO over the tiles.
    pub(super) fn backward_tiles(&self, q: &[f32], k: &[f32], v: &[f32], grad: &[f32]) -> [Vec<f32>; 3] {
        let (t, d, keys, group) = (self.t, self.d, self.mask.offset + self.t, self.group());
        let scale = self.scale as f32;
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        dq.par_chunks_mut(group * t * d)
            .zip(dk.par_chunks_mut(keys * d).zip(dv.par_chunks_mut(keys * d)))
            .enumerate()
            .for_each(|(task, (dq, (dk, dv)))| {
                let kv = task % self.kv_heads;
                let q = &q[task * group * t * d..][..group * t * d];
                let grad = &grad[task * group * t * d..][..group * t * d];
                let (k, v) = (&k[task * keys * d..][..keys * d], &v[task * keys * d..][..keys * d]);
                let [mut scores, mut probs, mut ds, mut part] = self.tile_scratch();
                for tile in self.tiles() {
                    let (m, n) = (group * tile.len, tile.hi - tile.lo);
                    let (scores, probs, ds) = (&mut scores[..m * n], &mut probs[..m * n], &mut ds[..m * n]);
                    let (keys_seen, values_seen) = (&k[tile.lo * d..tile.hi * d], &v[tile.lo * d..tile.hi * d]);
                    let (q_rows, go_rows) = (self.tile_rows(q, &tile), self.tile_rows(grad, &tile));
                    self.tile_probs(&q_rows, keys_seen, &tile, kv, scores, probs);
                    bf16_matmul::matmul_into(ds, Lhs::Rows(&go_rows), m, d, Rhs::TransposedF32(values_seen), n);
                    for (dp, p) in ds.chunks_mut(n).zip(probs.chunks(n)) {
                        ops::softmax_backward_row(p, dp);
                    }
                    let ds = &*ds;
                    bf16_matmul::matmul_into(&mut part[..m * d], Lhs::Rows(ds), m, n, Rhs::PlainF32(keys_seen), d);
                    self.put_tile_rows(dq, &tile, &part[..m * d], scale);
                    bf16_matmul::matmul_into(&mut part[..n * d], Lhs::Columns(ds), n, m, Rhs::PlainF32(&q_rows), d);
                    add_scaled(&mut dk[tile.lo * d..tile.hi * d], &part[..n * d], scale);
                    bf16_matmul::matmul_into(&mut part[..n * d], Lhs::Columns(probs), n, m, Rhs::PlainF32(&go_rows), d);
                    add_scaled(&mut dv[tile.lo * d..tile.hi * d], &part[..n * d], 1.0);
                }
            });
        [dq, dk, dv]
    }
}

/// acc += part · factor
fn add_scaled(acc: &mut [f32], part: &[f32], factor: f32) {
    for (a, &p) in acc.iter_mut().zip(part) {
        *a += p * factor;
    }
}
