//! Matrix multiplication with bf16 operands and f32 accumulation on the CPU, for the frozen
//! linears when a CPU run computes in bf16 (`model.dtype = "bf16"`).
//!
//! The activations stay f32 (our fused elementwise kernels are f32); only the operands of the
//! frozen matmuls are rounded to bf16 (round to nearest even, as torch's autocast casts them),
//! multiplied in pairs by AVX512-BF16's `vdpbf16ps` and summed in f32. On CPUs that have it the
//! dot product runs several times faster than an f32 FMA gemm (measured in the closing note of
//! issue 17); elsewhere `matmul` gives the same numbers (up to summation order) through the f32
//! gemm on the rounded operands.
//!
//! Layout: A [m, k] is rounded into rows of bf16 pairs (k padded to even); B is packed per
//! panel of `NR` columns as [k/2][NR] pairs, the layout `vdpbf16ps` multiplies against a
//! broadcast pair of A. Each rayon task packs its own panel and runs every row block over it.

use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

/// Rows of A per micro-kernel call.
const MR: usize = 8;
/// Columns of B per panel: three 16-lane registers (8 × 3 accumulators + 3 B + 1 A of 32).
const NR: usize = 48;
/// The narrow geometry for a B only 64 columns wide (attention's head_dim: 48 + 16 would waste
/// a third of the second panel): 12 rows × 32 columns (12 × 2 accumulators + 2 B + 1 A).
const MR_NARROW: usize = 12;
const NR_NARROW: usize = 32;

/// The right-hand operand of C = A · B, described by a frozen weight W.
#[derive(Clone, Copy)]
pub enum Rhs<'a> {
    /// B = Wᵀ with W [n, k] row-major in f32 (the forward y = x · Wᵀ).
    TransposedF32(&'a [f32]),
    /// B = Wᵀ with W [n, k] row-major in bf16.
    TransposedBf16(&'a [bf16]),
    /// B = W [k, n] row-major in f32 (the input gradient dy · W).
    PlainF32(&'a [f32]),
    /// B = W [k, n] row-major in bf16.
    PlainBf16(&'a [bf16]),
    /// B = Wᵀ with W [n, k] packed once (`PackedWeight`): the panels are read as they are.
    TransposedPacked(&'a PackedWeight),
    /// B = W [k, n] packed once: its panels are regathered from the packed form per call.
    PlainPacked(&'a PackedWeight),
}

impl Rhs<'_> {
    fn len(&self) -> usize {
        match self {
            Rhs::TransposedF32(w) | Rhs::PlainF32(w) => w.len(),
            Rhs::TransposedBf16(w) | Rhs::PlainBf16(w) => w.len(),
            Rhs::TransposedPacked(w) | Rhs::PlainPacked(w) => w.rows * w.cols,
        }
    }

    /// Element (kk, j) of B as bf16 bits; zero outside [k, n] (the padding).
    #[inline(always)]
    fn at(&self, kk: usize, j: usize, k: usize, n: usize) -> u16 {
        if kk >= k || j >= n {
            return 0;
        }
        match self {
            Rhs::TransposedF32(w) => bf16::from_f32(w[j * k + kk]).to_bits(),
            Rhs::TransposedBf16(w) => w[j * k + kk].to_bits(),
            Rhs::PlainF32(w) => bf16::from_f32(w[kk * n + j]).to_bits(),
            Rhs::PlainBf16(w) => w[kk * n + j].to_bits(),
            Rhs::TransposedPacked(w) => w.get(j, kk).to_bits(),
            Rhs::PlainPacked(w) => w.get(kk, j).to_bits(),
        }
    }
}

/// A frozen weight W [rows, cols] packed once into the panels the kernel multiplies in the
/// forward (B = Wᵀ): panel b holds W's rows [NR·b, NR·b + NR) as [cols/2][NR] bf16 pairs (low
/// half: the even column), zero past the last row and past an odd column count.
///
/// It replaces the dense bf16 weight, so it costs no memory beyond padding: the forward reads
/// its panels as they are (no per-call gather of 48 rows a whole row apart, which streamed the
/// output layer from memory at half the kernel's rate), and the backward (B = W) regathers its
/// panels from this form out of tiles that sit in L1 (`avx512::gather_packed_plain`).
pub struct PackedWeight {
    rows: usize,
    cols: usize,
    pairs: Vec<u32>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight [{}, {}] (bf16 panels)", self.rows, self.cols)
    }
}

impl PackedWeight {
    /// Packs W [rows, cols] row-major; f32 values are rounded to nearest even.
    pub fn pack(w: Rhs, rows: usize, cols: usize) -> Self {
        assert!(
            matches!(w, Rhs::TransposedBf16(_) | Rhs::TransposedF32(_)) && w.len() == rows * cols,
            "PackedWeight::pack takes W [rows, cols] as a transposed right-hand side"
        );
        let panel_len = cols.div_ceil(2) * NR;
        let mut pairs = vec![0u32; rows.div_ceil(NR) * panel_len];
        pairs.par_chunks_mut(panel_len).enumerate().for_each(|(b, out)| pack_panel(w, cols, rows, b * NR, out));
        Self { rows, cols, pairs }
    }

    /// (rows, cols) of W
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.pairs.len() * 4
    }

    /// W[r, c]
    pub fn get(&self, r: usize, c: usize) -> bf16 {
        let pair = self.panel(r / NR)[c / 2 * NR + r % NR];
        bf16::from_bits((pair >> (16 * (c % 2))) as u16)
    }

    /// Rows `ids` of W in f32 (an embedding lookup when W is a tied embedding table).
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Vec<f32>, String> {
        if let Some(&bad) = ids.iter().find(|&&r| r as usize >= self.rows) {
            return Err(format!("token id {bad} is outside the vocabulary of {} entries", self.rows));
        }
        Ok(ids.iter().flat_map(|&r| (0..self.cols).map(move |c| self.get(r as usize, c).to_f32())).collect())
    }

    /// W row-major.
    pub fn to_bf16(&self) -> Vec<bf16> {
        let mut w = vec![bf16::ZERO; self.rows * self.cols];
        w.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(r, row)| {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.get(r, c);
            }
        });
        w
    }

    /// Panel b: W's rows [NR·b, NR·b + NR) as [cols/2][NR] pairs.
    fn panel(&self, b: usize) -> &[u32] {
        let len = self.cols.div_ceil(2) * NR;
        &self.pairs[b * len..][..len]
    }
}

/// Whether this CPU runs the `vdpbf16ps` kernel (checked at run time: the build never assumes
/// the build machine's features).
pub fn has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // (every CPU with AVX512-BF16 has AVX512-BW, which the packed backward's shuffle uses)
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 operands pay on this CPU, so that "auto" computes in bf16 here: the kernel
/// runs (AVX512-BF16) and, timed once per process on a SmolLM2-sized product (a few
/// milliseconds), beats the f32 gemm by at least a quarter. The dot product's rate differs by
/// CPU: 4× the f32 FMA rate on AMD Zen 5, half of it on Intel Sapphire Rapids
/// (../shared/docs/cpu-bf16.md), where f32 stays the better choice.
pub fn pays_on_this_cpu() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| {
        if !has_bf16_dot() {
            return false;
        }
        let (m, k, n) = (256, 576, 576);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 1000) as f32 - 500.0) / 500.0).collect();
        let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut c = vec![0f32; m * n];
        let (mut t_f32, mut t_bf16) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let start = std::time::Instant::now();
            f32_matmul_into(&mut c, 0.0, Mat::new(&a, m, k), Mat::new(&w, n, k).t(), 1.0);
            t_f32 = t_f32.min(start.elapsed().as_secs_f64());
            let start = std::time::Instant::now();
            std::hint::black_box(matmul(&a, m, k, Rhs::TransposedBf16(&w16), n));
            t_bf16 = t_bf16.min(start.elapsed().as_secs_f64());
        }
        t_f32 >= 1.25 * t_bf16
    })
}

/// The left-hand operand A [m, k] of C = A · B, in f32.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    /// A row-major [m, k].
    Rows(&'a [f32]),
    /// A = Sᵀ for S [k, m] row-major (attention's backward multiplies transposed scores).
    Columns(&'a [f32]),
}

impl Lhs<'_> {
    fn data(&self) -> &[f32] {
        match self {
            Lhs::Rows(a) | Lhs::Columns(a) => a,
        }
    }

    /// Element (i, kk) of A.
    fn at(&self, i: usize, kk: usize, m: usize, k: usize) -> f32 {
        match self {
            Lhs::Rows(a) => a[i * k + kk],
            Lhs::Columns(a) => a[kk * m + i],
        }
    }
}

/// C [m, n] = round_bf16(A) [m, k] · round_bf16(B) [k, n], summed in f32.
pub fn matmul(a: &[f32], m: usize, k: usize, b: Rhs, n: usize) -> Vec<f32> {
    // never zero-filled: the product writes every element once (a memset of C was ~1.5% of a
    // bf16 training step)
    let mut c = Vec::with_capacity(m * n);
    matmul_into_uninit(&mut c.spare_capacity_mut()[..m * n], Lhs::Rows(a), m, k, b, n);
    // SAFETY: matmul_into_uninit initialized all m · n elements.
    unsafe { c.set_len(m * n) };
    c
}

/// `matmul` into C [m, n] (every element overwritten), for either layout of A.
pub fn matmul_into(c: &mut [f32], a: Lhs, m: usize, k: usize, b: Rhs, n: usize) {
    // SAFETY: MaybeUninit<f32> has f32's layout, and only f32 values are written through it.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    matmul_into_uninit(c, a, m, k, b, n)
}

/// `matmul_into` on memory not yet initialized: every element of C is written.
fn matmul_into_uninit(c: &mut [MaybeUninit<f32>], a: Lhs, m: usize, k: usize, b: Rhs, n: usize) {
    assert_eq!(a.data().len(), m * k, "A must hold m · k elements");
    assert_eq!(b.len(), k * n, "B must hold k · n elements");
    assert_eq!(c.len(), m * n, "C must be [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_bf16_dot() {
        // SAFETY: the CPU has AVX-512F/BW and AVX512-BF16 (checked just above); C holds m · n.
        return unsafe { avx512::matmul_into(c.as_mut_ptr() as *mut f32, a, m, k, b, n) };
    }
    c.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just initialized.
    let c = unsafe { &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32]) };
    matmul_reference_into(c, a, m, k, b, n)
}

/// The same product through the f32 gemm on the bf16-rounded operands: the fallback for CPUs
/// without AVX512-BF16, and the twin the kernel is tested against.
pub fn matmul_reference_into(c: &mut [f32], a: Lhs, m: usize, k: usize, b: Rhs, n: usize) {
    let mut a16 = vec![0f32; m * k];
    a16.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (kk, v) in row.iter_mut().enumerate() {
            *v = bf16::from_f32(a.at(i, kk, m, k)).to_f32();
        }
    });
    let mut bt = vec![0f32; k * n];
    bt.par_chunks_mut(n).enumerate().for_each(|(kk, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = bf16::from_bits(b.at(kk, j, k, n)).to_f32();
        }
    });
    f32_matmul_into(c, 0.0, Mat::new(&a16, m, k), Mat::new(&bt, k, n), 1.0);
}

/// A row-major f32 matrix (data, rows, cols) for `f32_matmul_into`, read as it is or transposed.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Mat<'a> {
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self { data, rows, cols, transposed: false }
    }
    pub(crate) fn t(self) -> Self {
        Self { transposed: !self.transposed, ..self }
    }
    /// (rows, cols) as read
    fn dims(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
    /// (column stride, row stride) as read
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (self.cols as isize, 1)
        } else {
            (1, self.cols as isize)
        }
    }
}

/// out = keep·out + alpha·(a·b), out row-major [a rows, b cols]; keep 0 overwrites.
pub(crate) fn f32_matmul_into(out: &mut [f32], keep: f32, a: Mat, b: Mat, alpha: f32) {
    let ((m, k), (k2, n)) = (a.dims(), b.dims());
    assert!(k == k2 && out.len() == m * n, "f32 matmul of {:?} by {:?}", a.dims(), b.dims());
    let ((a_cs, a_rs), (b_cs, b_rs)) = (a.strides(), b.strides());
    // SAFETY: the dimensions and strides above describe the slices exactly.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            keep != 0.0,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            keep,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

/// Packs columns [j0, j0 + NR) of B as [k/2][NR] pairs of bf16 (low half: the even k).
fn pack_panel(b: Rhs, k: usize, n: usize, j0: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    debug_assert_eq!(out.len(), kp * NR);
    match b {
        // Rows of W are columns of B: a row's pairs are adjacent in memory. Transposed in blocks
        // of 16 pairs (one cache line of bf16) so that reads and writes both stay in L1.
        Rhs::TransposedBf16(w) if k.is_multiple_of(2) => {
            #[cfg(target_arch = "x86_64")]
            if n - j0 >= NR && has_bf16_dot() {
                // SAFETY: AVX-512F checked; rows j0..j0 + NR of W exist (n - j0 >= NR).
                return unsafe { avx512::gather_panel(w, k, j0, out) };
            }
            transpose_pairs(out, kp, n - j0, |jj, p| {
                let row = &w[(j0 + jj) * k + 2 * p..];
                row[0].to_bits() as u32 | (row[1].to_bits() as u32) << 16
            })
        }
        #[cfg(target_arch = "x86_64")]
        Rhs::TransposedF32(w) if has_bf16_dot() => {
            // SAFETY: AVX-512F and AVX512-BF16 checked; W holds n rows of k.
            unsafe { avx512::gather_panel_f32(w, k, n, j0, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Rhs::PlainPacked(w) if has_bf16_dot() => {
            // SAFETY: AVX-512F/BW checked; j0 lies inside W's columns (n = W's cols).
            unsafe { avx512::gather_packed_plain(w, j0, out) }
        }
        Rhs::TransposedF32(w) if k.is_multiple_of(2) => transpose_pairs(out, kp, n - j0, |jj, p| {
            let row = &w[(j0 + jj) * k + 2 * p..];
            bf16::from_f32(row[0]).to_bits() as u32 | (bf16::from_f32(row[1]).to_bits() as u32) << 16
        }),
        // Plain B: two rows of B interleaved, 48 contiguous elements from each.
        Rhs::PlainBf16(w) if n - j0 >= NR => {
            for p in 0..kp {
                let even = &w[2 * p * n + j0..][..NR];
                let odd: &[bf16] = if 2 * p + 1 < k { &w[(2 * p + 1) * n + j0..][..NR] } else { &[bf16::ZERO; NR] };
                for ((dst, e), o) in out[p * NR..(p + 1) * NR].iter_mut().zip(even).zip(odd) {
                    *dst = e.to_bits() as u32 | (o.to_bits() as u32) << 16;
                }
            }
        }
        // The rest (odd k, a last partial panel): element by element.
        _ => {
            for p in 0..kp {
                let dst = &mut out[p * NR..(p + 1) * NR];
                for (jj, v) in dst.iter_mut().enumerate() {
                    let j = j0 + jj;
                    *v = b.at(2 * p, j, k, n) as u32 | (b.at(2 * p + 1, j, k, n) as u32) << 16;
                }
            }
        }
    }
}

/// out[p][jj] = pair(jj, p) for the panel's `valid` columns (zero beyond them), in blocks.
#[inline(always)]
fn transpose_pairs(out: &mut [u32], kp: usize, valid: usize, pair: impl Fn(usize, usize) -> u32) {
    const BLOCK: usize = 16;
    for p0 in (0..kp).step_by(BLOCK) {
        let p1 = (p0 + BLOCK).min(kp);
        for jj in 0..NR {
            if jj < valid {
                for p in p0..p1 {
                    out[p * NR + jj] = pair(jj, p);
                }
            } else {
                for p in p0..p1 {
                    out[p * NR + jj] = 0;
                }
            }
        }
    }
}

/// 16 bf16 pairs (even[i], odd[i]) from two 16-lane f32 vectors, each rounded to nearest even
/// as `vcvtne2ps2bf16` rounds (a zero vector gives zero halves: the padding pair). For callers
/// compiled with AVX-512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn bf16_pairs(
    even: std::arch::x86_64::__m512,
    odd: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lanes = |x| _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)));
    _mm512_or_si512(lanes(even), _mm512_slli_epi32::<16>(lanes(odd)))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{bf16_pairs, pack_panel, Lhs, PackedWeight, Rhs, MR, MR_NARROW, NR, NR_NARROW};
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// A raw pointer to C shared by the tasks: each writes a disjoint set of columns.
    #[derive(Clone, Copy)]
    struct SharedOut(*mut f32);
    // SAFETY: the tasks write disjoint column panels of C and nothing reads C meanwhile.
    unsafe impl Send for SharedOut {}
    unsafe impl Sync for SharedOut {}

    impl SharedOut {
        /// (a method, so that closures capture the whole Sync wrapper, not its raw field)
        fn at(self, offset: usize) -> *mut f32 {
            self.0.wrapping_add(offset)
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn matmul_into(c: *mut f32, a: Lhs, m: usize, k: usize, b: Rhs, n: usize) {
        // Narrow panels where they pad B less (a plain f32 B of 64 columns: 64 against 96). Only
        // the plain f32 packer has the narrow form; the weights' packers all make 48 columns.
        let narrow = matches!(b, Rhs::PlainF32(_)) && n.div_ceil(NR_NARROW) * NR_NARROW < n.div_ceil(NR) * NR;
        if narrow {
            multiply::<MR_NARROW, { NR_NARROW / 16 }>(c, a, m, k, b, n)
        } else {
            multiply::<MR, { NR / 16 }>(c, a, m, k, b, n)
        }
    }

    /// C = A · B in blocks of R rows × panels of 16·G columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn multiply<const R: usize, const G: usize>(c: *mut f32, a: Lhs, m: usize, k: usize, b: Rhs, n: usize) {
        let width = 16 * G;
        let kp = k.div_ceil(2);
        // A rounded to bf16 pairs (an odd k padded with zero), m padded to R rows: as rows of
        // kp pairs, or for A = Sᵀ as kp runs of m_padded pairs, each from two rows of S. Every
        // element is written (the padding with zeros), so the buffer is never zero-filled first.
        let m_padded = m.div_ceil(R) * R;
        let mut a16 = Vec::<u32>::with_capacity(m_padded * kp);
        let spare = &mut a16.spare_capacity_mut()[..m_padded * kp];
        // (row stride, pair stride) of a16
        let strides = match a {
            Lhs::Rows(a) => {
                let (rows, padding) = spare.split_at_mut(m * kp);
                padding.fill(MaybeUninit::new(0));
                rows.par_chunks_mut(kp).zip(a.par_chunks(k)).for_each(|(dst, src)| {
                    // SAFETY: this function runs only where the features are present.
                    unsafe { round_row(src, dst) }
                });
                (kp, 1)
            }
            Lhs::Columns(s) => {
                spare.par_chunks_mut(m_padded).enumerate().for_each(|(p, dst)| {
                    let odd = (2 * p + 1 < k).then(|| &s[(2 * p + 1) * m..][..m]);
                    dst[m..].fill(MaybeUninit::new(0));
                    // SAFETY: as above.
                    unsafe { interleave_rows(&s[2 * p * m..][..m], odd, dst) }
                });
                (1, m_padded)
            }
        };
        // SAFETY: all m_padded · kp pairs were written just above.
        a16.set_len(m_padded * kp);
        let out = SharedOut(c);
        let panels = n.div_ceil(width);
        (0..panels).into_par_iter().for_each_init(
            || vec![0u32; if matches!(b, Rhs::TransposedPacked(_)) { 0 } else { kp * width }],
            |scratch, panel| {
                let j0 = panel * width;
                // panels 16·G wide: the weights' forms are all 48 (`pack_panel`); a plain f32 B
                // takes either width
                let packed: &[u32] = match b {
                    Rhs::TransposedPacked(w) => w.panel(panel),
                    // SAFETY: the features are present; W holds k rows of n.
                    Rhs::PlainF32(w) => unsafe {
                        pack_plain_f32::<G>(w, k, n, j0, scratch);
                        scratch
                    },
                    _ => {
                        pack_panel(b, k, n, j0, scratch);
                        scratch
                    }
                };
                let cols = width.min(n - j0);
                for i0 in (0..m).step_by(R) {
                    let rows = R.min(m - i0);
                    // SAFETY: a16 holds m_padded rows of kp pairs, `packed` kp × width pairs, and
                    // the block written ([i0, i0 + rows) × [j0, j0 + cols)) lies inside C.
                    unsafe {
                        let a_block = a16.as_ptr().add(i0 * strides.0);
                        kernel::<R, G>(kp, a_block, strides, packed.as_ptr(), out.at(i0 * n + j0), n, rows, cols)
                    };
                }
            },
        );
    }

    /// A full panel of B = Wᵀ from bf16 rows: for each pair index, three 16-lane gathers of that
    /// pair from 48 rows of W, stored contiguously.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_panel(w: &[half::bf16], k: usize, j0: usize, out: &mut [u32]) {
        let kp = k / 2;
        assert!(w.len() >= (j0 + NR) * k && out.len() >= kp * NR);
        let base = w.as_ptr().add(j0 * k) as *const u8;
        // byte offsets of rows 0..16 of a 16-row group; k·2·16 fits i32 for any real weight
        let row_bytes = (k * 2) as i32;
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(row_bytes),
        );
        for p in 0..kp {
            let col = base.add(p * 4);
            for g in 0..NR / 16 {
                let v = _mm512_i32gather_epi32::<1>(offsets, col.add(g * 16 * k * 2) as *const _);
                _mm512_storeu_si512(out.as_mut_ptr().add(p * NR + g * 16) as *mut _, v);
            }
        }
    }

    /// A panel of B = W (columns j0..j0 + NR: W's columns; pairs of W's rows) from W packed.
    /// Rows 2q and 2q + 1 of W sit side by side in packed panel 2q / NR, so their elements in
    /// columns 2p and 2p + 1 are one 8-byte word [W[2q,2p], W[2q,2p+1], W[2q+1,2p], W[2q+1,2p+1]]
    /// at pair row p. Words for 8 q are contiguous per p: 8 × 8 tiles of words (p × q) are
    /// loaded, transposed to q × p in registers and reordered within each word into the pairs
    /// (W[2q,2p], W[2q+1,2p]) and (W[2q,2p+1], W[2q+1,2p+1]). Pair rows past W's columns read as
    /// zero; the row past an odd row count is the packed form's zero padding.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn gather_packed_plain(w: &PackedWeight, j0: usize, out: &mut [u32]) {
        let kq = w.rows.div_ceil(2);
        let kp_w = w.cols.div_ceil(2);
        assert!(j0.is_multiple_of(NR) && j0 < w.cols && out.len() >= kq * NR);
        // per 8-byte word: 16-bit elements [a, b, c, d] → [a, c, b, d]
        let swap = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15));
        for q0 in (0..kq).step_by(8) {
            let panel = w.panel(2 * q0 / NR);
            let words = panel.as_ptr().add(2 * q0 % NR);
            for s0 in (0..NR / 2).step_by(8) {
                let p0 = j0 / 2 + s0;
                let rows: [__m512i; 8] = std::array::from_fn(|r| {
                    if p0 + r < kp_w {
                        _mm512_loadu_si512(words.add((p0 + r) * NR) as *const _)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                let columns = transpose_8x8_words(rows);
                for (c, &column) in columns.iter().enumerate().take(kq - q0) {
                    let pairs = _mm512_shuffle_epi8(column, swap);
                    _mm512_storeu_si512(out.as_mut_ptr().add((q0 + c) * NR + 2 * s0) as *mut _, pairs);
                }
            }
        }
    }

    /// The transpose of an 8 × 8 matrix of 64-bit words held as 8 rows.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose_8x8_words(r: [__m512i; 8]) -> [__m512i; 8] {
        // pairs of rows interleaved: t[2i] holds columns 0, 2, 4, 6 of rows 2i, 2i + 1; t[2i + 1] the odd ones
        let t: [__m512i; 8] = std::array::from_fn(|x| {
            let (i, odd) = (x / 2, x % 2 == 1);
            if odd {
                _mm512_unpackhi_epi64(r[2 * i], r[2 * i + 1])
            } else {
                _mm512_unpacklo_epi64(r[2 * i], r[2 * i + 1])
            }
        });
        // 128-bit lanes: u[0..4] rows 0–3 of columns {0,4}, {1,5}, {2,6}, {3,7}; u[4..8] rows 4–7
        let u = |a: __m512i, b: __m512i, high: bool| {
            if high {
                _mm512_shuffle_i64x2::<0xdd>(a, b)
            } else {
                _mm512_shuffle_i64x2::<0x88>(a, b)
            }
        };
        let upper = [u(t[0], t[2], false), u(t[1], t[3], false), u(t[0], t[2], true), u(t[1], t[3], true)];
        let lower = [u(t[4], t[6], false), u(t[5], t[7], false), u(t[4], t[6], true), u(t[5], t[7], true)];
        std::array::from_fn(|c| u(upper[c % 4], lower[c % 4], c >= 4))
    }

    /// Lanes below `valid` (of 16) set.
    fn lane_mask(valid: usize) -> __mmask16 {
        if valid >= 16 {
            0xffff
        } else {
            ((1u32 << valid) - 1) as __mmask16
        }
    }

    /// A panel of B = W [k, n] in f32 (columns j0..j0 + NR, zero past n; a zero pair past an odd
    /// k): two rows' 16-column runs rounded and interleaved per store.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_plain_f32<const G: usize>(w: &[f32], k: usize, n: usize, j0: usize, out: &mut [u32]) {
        let width = 16 * G;
        assert!(w.len() >= k * n && j0 < n && out.len() >= k.div_ceil(2) * width);
        let cols = width.min(n - j0);
        for p in 0..k.div_ceil(2) {
            for g in 0..G {
                let c0 = g * 16;
                let mask = lane_mask(cols.saturating_sub(c0));
                // masked lanes are not read, so the address may lie past the row's end
                let row = |r: usize| _mm512_maskz_loadu_ps(mask, w.as_ptr().wrapping_add(r * n + j0 + c0));
                let odd = if 2 * p + 1 < k { row(2 * p + 1) } else { _mm512_setzero_ps() };
                _mm512_storeu_si512(out.as_mut_ptr().add(p * width + c0) as *mut _, bf16_pairs(row(2 * p), odd));
            }
        }
    }

    /// A panel of B = Wᵀ from W [n, k] in f32: for each pair, 16-row gathers of its two
    /// elements, rounded and interleaved (rows past n and a pair past an odd k are zero).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn gather_panel_f32(w: &[f32], k: usize, n: usize, j0: usize, out: &mut [u32]) {
        assert!(w.len() >= k * n && j0 < n && out.len() >= k.div_ceil(2) * NR);
        assert!(k * 16 <= i32::MAX as usize, "row offsets fit i32");
        let cols = NR.min(n - j0);
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(k as i32),
        );
        for g in 0..NR / 16 {
            let mask = lane_mask(cols.saturating_sub(g * 16));
            let rows = w.as_ptr().wrapping_add((j0 + g * 16) * k);
            let column = |c: usize| {
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, rows.wrapping_add(c) as *const _)
            };
            for p in 0..k.div_ceil(2) {
                let odd = if 2 * p + 1 < k { column(2 * p + 1) } else { _mm512_setzero_ps() };
                _mm512_storeu_si512(out.as_mut_ptr().add(p * NR + g * 16) as *mut _, bf16_pairs(column(2 * p), odd));
            }
        }
    }

    /// dst[i] = the bf16 pair (even[i], odd[i]) (odd zero when absent); dst may run longer.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn interleave_rows(even: &[f32], odd: Option<&[f32]>, dst: &mut [MaybeUninit<u32>]) {
        let m = even.len();
        assert!(dst.len() >= m && odd.is_none_or(|o| o.len() == m));
        for i0 in (0..m).step_by(16) {
            let mask = lane_mask(m - i0);
            let lo = _mm512_maskz_loadu_ps(mask, even.as_ptr().add(i0));
            let hi = odd.map_or(_mm512_setzero_ps(), |o| _mm512_maskz_loadu_ps(mask, o.as_ptr().add(i0)));
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(i0) as *mut _, mask, bf16_pairs(lo, hi));
        }
    }

    /// One row of A rounded to bf16 pairs (round to nearest even, as `vcvtne2ps2bf16` does).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn round_row(src: &[f32], dst: &mut [MaybeUninit<u32>]) {
        let mut chunks = src.chunks_exact(32);
        let mut p = 0;
        for chunk in &mut chunks {
            let lo = _mm512_loadu_ps(chunk.as_ptr());
            let hi = _mm512_loadu_ps(chunk.as_ptr().add(16));
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(p) as *mut _, packed);
            p += 16;
        }
        let rest = chunks.remainder();
        for (i, pair) in rest.chunks(2).enumerate() {
            let lo = half::bf16::from_f32(pair[0]).to_bits() as u32;
            let hi = pair.get(1).map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
            dst[p + i] = MaybeUninit::new(lo | hi << 16);
        }
    }

    /// C[rows, cols] = A-block · B-panel over kp pairs: A-block is R rows of kp pairs, pair
    /// (r, p) at r · row stride + p · pair stride; the panel kp × 16·G pairs; C has row stride ldc.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize, const G: usize>(
        kp: usize,
        a: *const u32,
        (a_rs, a_ps): (usize, usize),
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        for p in 0..kp {
            let bp = b.add(p * 16 * G);
            let bv: [__m512bh; G] =
                std::array::from_fn(|g| std::mem::transmute(_mm512_loadu_si512(bp.add(16 * g) as *const _)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * a_rs + p * a_ps) as i32));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbf16_ps(*acc, ar, bv);
                }
            }
        }
        if cols == 16 * G {
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let row = c.add(r * ldc);
                for (g, &v) in acc.iter().enumerate() {
                    _mm512_storeu_ps(row.add(16 * g), v);
                }
            }
        } else {
            // a last partial panel (attention's head_dim and key counts): masked stores
            let masks: [__mmask16; G] = std::array::from_fn(|g| lane_mask(cols.saturating_sub(16 * g)));
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let row = c.add(r * ldc);
                for (g, (&v, &mask)) in acc.iter().zip(&masks).enumerate() {
                    _mm512_mask_storeu_ps(row.wrapping_add(16 * g), mask, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        Rng::new(seed).normal(n, 0.0, 1.0)
    }

    /// Exact f64 sums of the bf16-rounded operands: what both paths approximate in f32.
    fn exact(a: &[f32], m: usize, k: usize, b: Rhs, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| bf16::from_f32(a[i * k + kk]).to_f64() * bf16::from_bits(b.at(kk, j, k, n)).to_f64())
                    .sum();
            }
        }
        c
    }

    fn check(m: usize, k: usize, n: usize) {
        let a = values(m * k, 1);
        let w = values(k * n, 2);
        let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        // W [n, k] for the transposed forms, [k, n] for the plain ones
        let packed_t = PackedWeight::pack(Rhs::TransposedBf16(&w16), n, k);
        let packed_p = PackedWeight::pack(Rhs::TransposedF32(&w), k, n);
        assert_eq!(packed_t.to_bf16(), w16, "packing loses nothing");
        assert_eq!(packed_p.to_bf16(), w16);
        for rhs in [
            Rhs::TransposedF32(&w),
            Rhs::TransposedBf16(&w16),
            Rhs::PlainF32(&w),
            Rhs::PlainBf16(&w16),
            Rhs::TransposedPacked(&packed_t),
            Rhs::PlainPacked(&packed_p),
        ] {
            let want = exact(&a, m, k, rhs, n);
            // A as it is and as the transpose of S = Aᵀ [k, m]
            let s: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let run = |lhs: Lhs, reference: bool| {
                let mut c = vec![f32::NAN; m * n];
                if reference {
                    matmul_reference_into(&mut c, lhs, m, k, rhs, n);
                } else {
                    matmul_into(&mut c, lhs, m, k, rhs, n);
                }
                c
            };
            for (name, got) in [
                ("kernel", matmul(&a, m, k, rhs, n)),
                ("kernel, A transposed", run(Lhs::Columns(&s), false)),
                ("reference", run(Lhs::Rows(&a), true)),
                ("reference, A transposed", run(Lhs::Columns(&s), true)),
            ] {
                assert_eq!(got.len(), m * n);
                for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    // f32 sums of k products of size ~1: error ~ k · 2⁻²⁴ · |terms|
                    let tol = 1e-6 * k as f64 * (1.0 + e.abs());
                    assert!((g as f64 - e).abs() <= tol, "{name} m={m} k={k} n={n} at {i}: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn matches_the_exact_product_of_the_rounded_operands() {
        // full panels and blocks, ragged edges in every dimension, odd k, a single row
        check(16, 64, 96);
        check(13, 37, 50);
        check(1, 9, 7);
        check(9, 130, 49);
        // attention's head_dim: two narrow panels for a plain f32 B, rows not a multiple of 12
        check(25, 70, 64);
    }
}
