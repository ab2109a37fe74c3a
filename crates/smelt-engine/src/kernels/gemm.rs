//! Matrix multiplication through rten-gemm (packed, SIMD, multi-threaded with rayon).
//!
//! Everything here takes plain row-major slices; transposes are expressed as strides so no copy
//! is made. One executor is shared process-wide because choosing its kernel probes the CPU.

use rayon::prelude::*;
use rten_gemm::{BiasVector, GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix};
use rten_tensor::Matrix;
use smelt_tensor::{bail, Result};
use std::sync::OnceLock;

fn executor() -> &'static GemmExecutor<f32> {
    // The executor is Sync but not Send, so the lock holds a leaked shared reference.
    static EXEC: OnceLock<&'static GemmExecutor<f32>> = OnceLock::new();
    EXEC.get_or_init(|| Box::leak(Box::new(GemmExecutor::<f32>::default())))
}

/// A bias added to every product.
#[derive(Clone, Copy, Debug)]
pub enum Bias<'a> {
    /// One value per output column (length `n`), as in a fully connected layer.
    PerColumn(&'a [f32]),
    /// One value per output row (length `m`), as in a convolution's per-channel bias.
    PerRow(&'a [f32]),
}

/// Views `data` as an `rows x cols` matrix, stored transposed when `trans`.
fn view(data: &[f32], rows: usize, cols: usize, trans: bool) -> Result<Matrix<'_>> {
    let strides = if trans { [1, rows] } else { [cols, 1] };
    match Matrix::from_data_with_strides([rows, cols], data, strides) {
        Ok(m) => Ok(m),
        Err(e) => bail!(
            Shape,
            "cannot view {} elements as a {rows}x{cols} matrix: {e:?}",
            data.len()
        ),
    }
}

/// `out = alpha * op(A) @ op(B) + beta * out (+ bias)`, with `op(A)` of shape `m x k` and
/// `op(B)` of shape `k x n`. `a` holds `m x k` (or `k x m` when `a_trans`), `b` holds `k x n`
/// (or `n x k` when `b_trans`), `out` holds `m x n`. `bias` has one value per column.
/// When `beta` is 0 the previous contents of `out` are ignored (NaNs included).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_trans: bool,
    b: &[f32],
    b_trans: bool,
    out: &mut [f32],
    alpha: f32,
    beta: f32,
    bias: Option<&[f32]>,
) -> Result<()> {
    gemm(
        m,
        k,
        n,
        a,
        a_trans,
        b,
        b_trans,
        out,
        alpha,
        beta,
        bias.map(Bias::PerColumn),
    )
}

/// [`sgemm`] with a bias that may be per row or per column.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_trans: bool,
    b: &[f32],
    b_trans: bool,
    out: &mut [f32],
    alpha: f32,
    beta: f32,
    bias: Option<Bias>,
) -> Result<()> {
    if a.len() < m * k || b.len() < k * n || out.len() != m * n {
        bail!(
            Shape,
            "gemm {m}x{k} @ {k}x{n}: got {} / {} / {} elements for A / B / out",
            a.len(),
            b.len(),
            out.len()
        );
    }
    match bias {
        Some(Bias::PerColumn(v)) if v.len() != n => {
            bail!(Shape, "gemm bias has {} values, expected {n}", v.len())
        }
        Some(Bias::PerRow(v)) if v.len() != m => {
            bail!(Shape, "gemm bias has {} values, expected {m}", v.len())
        }
        _ => {}
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // Nothing to multiply: only the scaled output and the bias remain.
        for (i, row) in out.chunks_mut(n).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                let prev = if beta == 0.0 { 0.0 } else { beta * *o };
                *o = prev
                    + match bias {
                        Some(Bias::PerColumn(v)) => v[j],
                        Some(Bias::PerRow(v)) => v[i],
                        None => 0.0,
                    };
            }
        }
        return Ok(());
    }
    let am = view(&a[..m * k], m, k, a_trans)?;
    let bm = view(&b[..k * n], k, n, b_trans)?;
    let opts = GemmOptions {
        alpha,
        beta,
        bias: bias.map(|b| match b {
            Bias::PerColumn(v) => BiasVector::Row(v),
            Bias::PerRow(v) => BiasVector::Column(v),
        }),
        ..Default::default()
    };
    if let Err(e) = executor().gemm(
        out,
        GemmInputA::Unpacked(am),
        GemmInputB::Unpacked(bm),
        opts,
    ) {
        bail!(Shape, "gemm {m}x{k} @ {k}x{n} failed: {e:?}");
    }
    Ok(())
}

/// Rows of A up to which a session packs constant f32 weights once (see `ops::nn`); the
/// int8 twin is `quant::PACKED_MAX_ROWS`.
pub const PACKED_MAX_ROWS: usize = 1024;

/// A right-hand matrix packed once for many products (constant weights): packing B costs
/// about as much as the product itself when A has few rows.
pub struct PackedB {
    inner: PackedBMatrix<f32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `b` (`k x n`, or `n x k` stored when `b_trans`).
    pub fn new(k: usize, n: usize, b: &[f32], b_trans: bool) -> Result<PackedB> {
        if b.len() < k * n || k == 0 || n == 0 {
            bail!(
                Shape,
                "cannot pack {} elements as a {k}x{n} matrix",
                b.len()
            );
        }
        let bm = view(&b[..k * n], k, n, b_trans)?;
        Ok(PackedB {
            inner: executor().prepack_b(bm),
            k,
            n,
        })
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }
}

/// [`sgemm`] with a prepacked right-hand matrix.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed(
    m: usize,
    a: &[f32],
    a_trans: bool,
    b: &PackedB,
    out: &mut [f32],
    alpha: f32,
    beta: f32,
    bias: Option<&[f32]>,
) -> Result<()> {
    let (k, n) = (b.k, b.n);
    if a.len() < m * k || out.len() != m * n || bias.is_some_and(|v| v.len() != n) {
        bail!(
            Shape,
            "packed gemm {m}x{k} @ {k}x{n}: buffer sizes do not match"
        );
    }
    if m == 0 {
        return Ok(());
    }
    let am = view(&a[..m * k], m, k, a_trans)?;
    let opts = GemmOptions {
        alpha,
        beta,
        bias: bias.map(BiasVector::Row),
        ..Default::default()
    };
    if let Err(e) = executor().gemm(
        out,
        GemmInputA::Unpacked(am),
        GemmInputB::Packed(&b.inner),
        opts,
    ) {
        bail!(Shape, "packed gemm {m}x{k} @ {k}x{n} failed: {e:?}");
    }
    Ok(())
}

/// A batch of products `out[i] = A[i] @ B[i]` (each `m x k` times `k x n`, row-major), where
/// matrix `i` of A starts at `a_offsets[i]` and of B at `b_offsets[i]`; repeated offsets express
/// broadcasting. `out` is the contiguous `[batch, m, n]` result.
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_offsets: &[usize],
    b: &[f32],
    b_offsets: &[usize],
    out: &mut [f32],
) -> Result<()> {
    let batch = a_offsets.len();
    if b_offsets.len() != batch || out.len() != batch * m * n {
        bail!(Shape, "batched matmul: inconsistent batch sizes");
    }
    if a_offsets.iter().any(|&o| o + m * k > a.len())
        || b_offsets.iter().any(|&o| o + k * n > b.len())
    {
        bail!(Shape, "batched matmul: a matrix lies outside its buffer");
    }
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    // A shared right-hand matrix with consecutive left-hand matrices (a linear layer over a
    // batch of sequences) is one tall product: far better for the GEMM's blocking.
    let shared_b = b_offsets.iter().all(|&o| o == b_offsets[0]);
    let consecutive_a = a_offsets
        .iter()
        .enumerate()
        .all(|(i, &o)| o == a_offsets[0] + i * m * k);
    if batch == 1 || (shared_b && consecutive_a) {
        let a0 = a_offsets[0];
        let b0 = b_offsets[0];
        return sgemm(
            batch * m,
            k,
            n,
            &a[a0..a0 + batch * m * k],
            false,
            &b[b0..b0 + k * n],
            false,
            out,
            1.0,
            0.0,
            None,
        );
    }
    let one = |(o, (&ao, &bo)): (&mut [f32], (&usize, &usize))| {
        sgemm(
            m,
            k,
            n,
            &a[ao..ao + m * k],
            false,
            &b[bo..bo + k * n],
            false,
            o,
            1.0,
            0.0,
            None,
        )
    };
    // Many small products: one thread per product beats splitting each one.
    if batch * m * k * n < 1 << 15 {
        out.chunks_mut(m * n)
            .zip(a_offsets.iter().zip(b_offsets))
            .try_for_each(one)
    } else {
        out.par_chunks_mut(m * n)
            .zip(a_offsets.par_iter().zip(b_offsets.par_iter()))
            .try_for_each(one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], at: bool, b: &[f32], bt: bool) -> Vec<f32> {
        let mut o = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let x = if at { a[p * m + i] } else { a[i * k + p] };
                    let y = if bt { b[j * k + p] } else { b[p * n + j] };
                    s += x * y;
                }
                o[i * n + j] = s;
            }
        }
        o
    }

    fn seq(n: usize, mul: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * mul).collect()
    }

    #[test]
    fn sgemm_matches_naive_with_transposes() {
        let (m, k, n) = (5, 7, 9);
        let a = seq(m * k, 0.5);
        let b = seq(k * n, 0.25);
        for &at in &[false, true] {
            for &bt in &[false, true] {
                let mut out = vec![1.0; m * n];
                sgemm(m, k, n, &a, at, &b, bt, &mut out, 2.0, 0.5, None).unwrap();
                let want = naive(m, k, n, &a, at, &b, bt);
                for (o, w) in out.iter().zip(&want) {
                    assert!((o - (2.0 * w + 0.5)).abs() < 1e-4, "{o} vs {w}");
                }
            }
        }
    }

    #[test]
    fn bias_per_row_and_column() {
        // [[1,2],[3,4]] @ I + bias
        let a = [1.0, 2.0, 3.0, 4.0];
        let eye = [1.0, 0.0, 0.0, 1.0];
        let mut out = vec![0.0; 4];
        gemm(
            2,
            2,
            2,
            &a,
            false,
            &eye,
            false,
            &mut out,
            1.0,
            0.0,
            Some(Bias::PerRow(&[10.0, 20.0])),
        )
        .unwrap();
        assert_eq!(out, vec![11.0, 12.0, 23.0, 24.0]);
        sgemm(
            2,
            2,
            2,
            &a,
            false,
            &eye,
            false,
            &mut out,
            1.0,
            0.0,
            Some(&[10.0, 20.0]),
        )
        .unwrap();
        assert_eq!(out, vec![11.0, 22.0, 13.0, 24.0]);
    }

    #[test]
    fn batched_with_shared_and_distinct_rhs() {
        let (m, k, n) = (3, 4, 2);
        let a = seq(2 * m * k, 1.0);
        let b = seq(2 * k * n, 0.5);
        let mut out = vec![0.0; 2 * m * n];
        batched_matmul(m, k, n, &a, &[0, m * k], &b, &[0, k * n], &mut out).unwrap();
        let w0 = naive(m, k, n, &a[..m * k], false, &b[..k * n], false);
        let w1 = naive(m, k, n, &a[m * k..], false, &b[k * n..], false);
        assert_eq!(&out[..m * n], &w0[..]);
        assert_eq!(&out[m * n..], &w1[..]);
        batched_matmul(m, k, n, &a, &[0, m * k], &b, &[k * n, k * n], &mut out).unwrap();
        let w0 = naive(m, k, n, &a[..m * k], false, &b[k * n..], false);
        assert_eq!(&out[..m * n], &w0[..]);
    }

    #[test]
    fn degenerate_shapes() {
        // Single row / single depth with transposed storage, and an empty depth with bias.
        let a = [1.0, 2.0, 3.0];
        let b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        for &(at, bt) in &[(true, true), (false, false), (true, false)] {
            let mut out = vec![0.0; 2];
            sgemm(1, 3, 2, &a, at, &b, bt, &mut out, 1.0, 0.0, None).unwrap();
            assert_eq!(out, naive(1, 3, 2, &a, at, &b, bt));
        }
        let mut out = vec![0.0; 6];
        sgemm(
            3,
            1,
            2,
            &a,
            true,
            &[1.0, 2.0],
            true,
            &mut out,
            1.0,
            0.0,
            None,
        )
        .unwrap();
        assert_eq!(out, vec![1.0, 2.0, 2.0, 4.0, 3.0, 6.0]);
        let mut out = vec![5.0; 4];
        sgemm(
            2,
            0,
            2,
            &[],
            false,
            &[],
            false,
            &mut out,
            1.0,
            0.0,
            Some(&[1.0, 2.0]),
        )
        .unwrap();
        assert_eq!(out, vec![1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn packed_rhs_matches_unpacked() {
        let (m, k, n) = (7, 300, 20);
        let a = seq(m * k, 0.1);
        let b = seq(k * n, 0.2);
        for &bt in &[false, true] {
            let packed = PackedB::new(k, n, &b, bt).unwrap();
            let mut out = vec![0.0; m * n];
            sgemm_packed(
                m,
                &a,
                false,
                &packed,
                &mut out,
                1.0,
                0.0,
                Some(&vec![1.0; n]),
            )
            .unwrap();
            let want = naive(m, k, n, &a, false, &b, bt);
            for (o, w) in out.iter().zip(&want) {
                assert!((o - (w + 1.0)).abs() < 1e-2, "{o} vs {w}");
            }
        }
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<PackedB>();
    }

    #[test]
    fn rejects_short_buffers() {
        let mut out = vec![0.0; 4];
        assert!(
            sgemm(2, 2, 2, &[1.0; 3], false, &[1.0; 4], false, &mut out, 1.0, 0.0, None).is_err()
        );
    }
}
