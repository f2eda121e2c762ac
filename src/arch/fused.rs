//! How the output rows of a fused projection split into their parts.

use std::ops::Range;

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitKind {
    /// [Q (nh·hd); K (nkv·hd); V (nkv·hd)]: Baichuan W_pack, Qwen c_attn, Phi Wqkv, ChatGLM.
    QkvContiguous,
    /// Per KV group: its nh/nkv query heads, then one K head, then one V head: Falcon (7B is
    /// one group), BLOOM (nkv = nh, so [q_h; k_h; v_h] per head).
    QkvGrouped,
    /// [gate (ffn); up (ffn)]: ChatGLM's dense_h_to_4h.
    GateUp,
}

/// Row indices of a fused qkv output that belong to q, k and v, each in head order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QkvRows {
    pub q: Vec<usize>,
    pub k: Vec<usize>,
    pub v: Vec<usize>,
}

impl SplitKind {
    /// The rows of q, k and v in a fused qkv output of nh query heads and nkv KV heads.
    pub fn qkv_rows(self, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Result<QkvRows> {
        if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::Invalid(format!(
                "cannot split q/k/v with {n_heads} heads, {n_kv_heads} KV heads and head size {head_dim}"
            )));
        }
        let range = |start: usize, heads: usize| (start * head_dim..(start + heads) * head_dim).collect::<Vec<_>>();
        match self {
            SplitKind::QkvContiguous => Ok(QkvRows {
                q: range(0, n_heads),
                k: range(n_heads, n_kv_heads),
                v: range(n_heads + n_kv_heads, n_kv_heads),
            }),
            SplitKind::QkvGrouped => {
                let per_group = n_heads / n_kv_heads;
                let mut rows = QkvRows { q: vec![], k: vec![], v: vec![] };
                for g in 0..n_kv_heads {
                    let base = g * (per_group + 2);
                    rows.q.extend(range(base, per_group));
                    rows.k.extend(range(base + per_group, 1));
                    rows.v.extend(range(base + per_group + 1, 1));
                }
                Ok(rows)
            }
            SplitKind::GateUp => Err(Error::Invalid("a gate/up projection has no q, k and v".into())),
        }
    }

    /// The gate and up halves of a fused gate/up output of `rows` rows.
    pub fn gate_up_rows(self, rows: usize) -> Result<(Range<usize>, Range<usize>)> {
        if self != SplitKind::GateUp || !rows.is_multiple_of(2) {
            return Err(Error::Invalid(format!("cannot split {rows} rows into gate and up with {self:?}")));
        }
        Ok((0..rows / 2, rows / 2..rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloom_is_interleaved_per_head() {
        // nh = nkv = 2, hd = 2: rows [q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1]
        let r = SplitKind::QkvGrouped.qkv_rows(2, 2, 2).unwrap();
        assert_eq!(r.q, vec![0, 1, 6, 7]);
        assert_eq!(r.k, vec![2, 3, 8, 9]);
        assert_eq!(r.v, vec![4, 5, 10, 11]);
    }

    #[test]
    fn falcon_multi_query_is_queries_then_k_then_v() {
        let r = SplitKind::QkvGrouped.qkv_rows(4, 1, 1).unwrap();
        assert_eq!((r.q, r.k, r.v), (vec![0, 1, 2, 3], vec![4], vec![5]));
    }

    #[test]
    fn falcon_40b_groups() {
        // 4 heads in 2 groups, hd 1: [q0 q1 k0 v0 q2 q3 k1 v1]
        let r = SplitKind::QkvGrouped.qkv_rows(4, 2, 1).unwrap();
        assert_eq!((r.q, r.k, r.v), (vec![0, 1, 4, 5], vec![2, 6], vec![3, 7]));
    }

    #[test]
    fn contiguous_with_kv_groups() {
        let r = SplitKind::QkvContiguous.qkv_rows(4, 2, 1).unwrap();
        assert_eq!((r.q, r.k, r.v), (vec![0, 1, 2, 3], vec![4, 5], vec![6, 7]));
        assert!(SplitKind::QkvContiguous.qkv_rows(3, 2, 1).is_err());
        assert_eq!(SplitKind::GateUp.gate_up_rows(8).unwrap(), (0..4, 4..8));
    }
}
