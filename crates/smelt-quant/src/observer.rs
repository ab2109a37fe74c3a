//! Activation range observers for static quantization.
//!
//! An [`Observer`] sees calibration batches one at a time and then proposes the clipping range
//! `[lo, hi]` that the quantization parameters are derived from.
//!
//! Every kind but `MinMax` keeps a two-sided histogram with one shared bin width `w`: `pos[i]`
//! counts `x >= 0` with `x` in `[i*w, (i+1)*w)`, `neg[i]` counts `x < 0` with `-x` in that bin.
//! Sharing the width makes the `|x|` histogram exactly `pos + neg` while each sign keeps full
//! resolution. When a batch exceeds the covered range, the width grows by an integer factor and
//! groups of bins merge exactly, so no value is ever dropped and the bin width stays within a
//! factor of two of `max|x| / bins`. Every reduction runs in a fixed order, so results are
//! deterministic.

use smelt_tensor::{bail, Result};

/// Bins per sign for `Percentile`, which has no `bins` parameter.
const PERCENTILE_BINS: usize = 4096;
const MIN_BINS: usize = 16;
const MAX_BINS: usize = 1 << 16;
/// Pseudo-count given to empty bins before normalising in the KL search.
const KL_EPS: f64 = 1e-4;
/// Bound on the alternating lo/hi minimisation of the asymmetric MSE search.
const MAX_DESCENT_ROUNDS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum ObserverKind {
    MinMax,
    /// Clip at the p-th percentile, p in (0, 100].
    Percentile(f64),
    /// TensorRT-style KL-divergence threshold search over a histogram of `bins` bins per sign.
    Entropy {
        bins: usize,
    },
    /// Minimise the expected squared quantization error over a histogram of `bins` bins per sign.
    Mse {
        bins: usize,
    },
}

impl ObserverKind {
    /// The observer named `minmax`, `percentile` (at `percentile`), `entropy` or `mse` (over
    /// `bins` histogram bins), as on a command line or in a recipe.
    pub fn parse(name: &str, percentile: f64, bins: usize) -> Result<ObserverKind> {
        Ok(match name {
            "minmax" => ObserverKind::MinMax,
            "percentile" => ObserverKind::Percentile(percentile),
            "entropy" => ObserverKind::Entropy { bins },
            "mse" => ObserverKind::Mse { bins },
            _ => bail!(
                Input,
                "unknown observer '{name}' (expected minmax, percentile, entropy or mse)"
            ),
        })
    }

    fn validate(self) -> Result<()> {
        match self {
            ObserverKind::MinMax => {}
            ObserverKind::Percentile(p) => {
                if !(p > 0.0 && p <= 100.0) {
                    bail!(Input, "percentile observer: p must be in (0, 100], got {p}");
                }
            }
            ObserverKind::Entropy { bins } | ObserverKind::Mse { bins } => {
                if !(MIN_BINS..=MAX_BINS).contains(&bins) {
                    bail!(
                        Input,
                        "observer: histogram bins must be in {MIN_BINS}..={MAX_BINS}, got {bins}"
                    );
                }
            }
        }
        Ok(())
    }

    fn histogram_bins(self) -> Option<usize> {
        match self {
            ObserverKind::MinMax => None,
            ObserverKind::Percentile(_) => Some(PERCENTILE_BINS),
            ObserverKind::Entropy { bins } | ObserverKind::Mse { bins } => Some(bins),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Observer {
    kind: ObserverKind,
    count: u64,
    /// Exact zeros seen (ReLU outputs, padding). Zero is always exactly representable, so the
    /// entropy search leaves them out: a spike at 0 would otherwise dominate the distribution
    /// and make clipping the informative tail look cheap.
    zeros: u64,
    min: f32,
    max: f32,
    /// None for `MinMax` and for an invalid kind (which every call then reports).
    hist: Option<Histogram>,
}

impl Observer {
    pub fn new(kind: ObserverKind) -> Observer {
        let hist = match kind.validate() {
            Ok(()) => kind.histogram_bins().map(Histogram::new),
            Err(_) => None,
        };
        Observer {
            kind,
            count: 0,
            zeros: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            hist,
        }
    }

    /// Feed one batch of values. NaN or Inf -> Err naming the problem (the caller adds which tensor).
    pub fn observe(&mut self, values: &[f32]) -> Result<()> {
        self.kind.validate()?;
        // Scan the whole batch first so a rejected batch leaves the observer untouched.
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for (i, &v) in values.iter().enumerate() {
            if !v.is_finite() {
                let what = if v.is_nan() { "NaN" } else { "infinite value" };
                bail!(Input, "{what} at position {i} of a calibration batch");
            }
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if values.is_empty() {
            return Ok(());
        }
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        self.count += values.len() as u64;
        if matches!(self.kind, ObserverKind::Entropy { .. }) {
            self.zeros += values.iter().filter(|&&v| v == 0.0).count() as u64;
        }
        if let Some(h) = &mut self.hist {
            h.add(values, f64::from(lo.abs().max(hi.abs())));
        }
        Ok(())
    }

    /// Number of values seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Observed (min, max); None before any value.
    pub fn min_max(&self) -> Option<(f32, f32)> {
        (self.count > 0).then_some((self.min, self.max))
    }

    /// The clipping range [lo, hi] to map onto `levels` quantization levels (256 for 8 bits).
    /// Symmetric: lo == -hi. Always lo <= 0 <= hi (zero must be representable). Err if no data.
    ///
    /// The range is never degenerate: `hi - lo` is at least `4 * (levels - 1) * f32::MIN_POSITIVE`,
    /// so `(hi - lo) / (levels - 1)` is a normal, non-zero scale. All-zero data thus gives
    /// `(0, tiny)`, or `(-tiny/2, tiny/2)` when symmetric.
    pub fn range(&self, levels: u32, symmetric: bool) -> Result<(f32, f32)> {
        self.kind.validate()?;
        if levels < 2 {
            bail!(
                Input,
                "observer: need at least 2 quantization levels, got {levels}"
            );
        }
        if self.count == 0 {
            bail!(Input, "observer: no calibration data was observed");
        }
        let (min, max) = (f64::from(self.min), f64::from(self.max));
        let max_abs = min.abs().max(max.abs());
        // A histogram without width has only seen zeros: min-max is then exact.
        let hist = self.hist.as_ref().filter(|h| h.width > 0.0);
        let (lo, hi) = match (self.kind, hist) {
            (ObserverKind::Percentile(p), Some(h)) => h.percentile(p / 100.0, symmetric),
            (ObserverKind::Entropy { .. }, Some(h)) => h.entropy(levels, symmetric, self.zeros),
            (ObserverKind::Mse { .. }, Some(h)) => h.mse(levels, symmetric),
            _ => (min, max),
        };
        let (lo, hi) = if symmetric {
            let t = (-lo).max(hi).min(max_abs).max(0.0) as f32;
            (-t, t)
        } else {
            (lo.max(min).min(0.0) as f32, hi.min(max).max(0.0) as f32)
        };
        Ok(widen_degenerate(lo, hi, levels, symmetric))
    }
}

/// Keeps the scale derived from the range a normal, non-zero f32.
fn widen_degenerate(lo: f32, hi: f32, levels: u32, symmetric: bool) -> (f32, f32) {
    let min_span = 4.0 * (levels - 1) as f32 * f32::MIN_POSITIVE;
    if symmetric {
        let t = hi.max(min_span / 2.0);
        (-t, t)
    } else if hi - lo < min_span {
        (lo, lo + min_span)
    } else {
        (lo, hi)
    }
}

// ---------------------------------------------------------------------------------------------
// Adaptive two-sided histogram

#[derive(Clone, Debug)]
struct Histogram {
    /// Shared bin width; 0 until the first non-zero value.
    width: f64,
    inv_width: f64,
    pos: Vec<u64>,
    neg: Vec<u64>,
    /// Zeros seen before the width was known.
    pending_zeros: u64,
}

impl Histogram {
    fn new(bins: usize) -> Histogram {
        Histogram {
            width: 0.0,
            inv_width: 0.0,
            pos: vec![0; bins],
            neg: vec![0; bins],
            pending_zeros: 0,
        }
    }

    fn set_width(&mut self, width: f64) {
        self.width = width;
        self.inv_width = 1.0 / width;
    }

    /// `max_abs` is the batch's largest |x|, already known to the caller.
    fn add(&mut self, values: &[f32], max_abs: f64) {
        let bins = self.pos.len();
        if max_abs == 0.0 {
            if self.width == 0.0 {
                self.pending_zeros += values.len() as u64;
            } else {
                self.pos[0] += values.len() as u64;
            }
            return;
        }
        if self.width == 0.0 {
            // Half a bin of headroom keeps the batch maximum inside the last bin.
            self.set_width(max_abs / (bins as f64 - 0.5));
            self.pos[0] += std::mem::take(&mut self.pending_zeros);
        }
        self.grow_to(max_abs);
        let last = bins - 1;
        for &v in values {
            // floor(a * inv_width) is monotone in a, so after grow_to every index is < bins.
            let i = ((f64::from(v.abs()) * self.inv_width) as usize).min(last);
            if v < 0.0 {
                self.neg[i] += 1;
            } else {
                self.pos[i] += 1;
            }
        }
    }

    /// Widens by integer factors (merging bins exactly) until `max_abs` falls in the last bin.
    fn grow_to(&mut self, max_abs: f64) {
        let bins = self.pos.len();
        while (max_abs * self.inv_width) as usize >= bins {
            let factor = (max_abs * self.inv_width / bins as f64).floor() + 1.0;
            if factor >= bins as f64 {
                for side in [&mut self.pos, &mut self.neg] {
                    let total = side.iter().sum();
                    side.fill(0);
                    side[0] = total;
                }
            } else {
                merge_bins(&mut self.pos, factor as usize);
                merge_bins(&mut self.neg, factor as usize);
            }
            self.set_width(self.width * factor);
        }
    }

    /// Counts of |x| per bin, without trailing empty bins.
    fn magnitudes(&self) -> Vec<u64> {
        let sum = self.pos.iter().zip(&self.neg).map(|(p, n)| p + n).collect();
        trim(sum)
    }

    fn has_negatives(&self) -> bool {
        self.neg.iter().any(|&c| c > 0)
    }

    /// Percentile range, linearly interpolated inside the bin that holds the rank.
    fn percentile(&self, q: f64, symmetric: bool) -> (f64, f64) {
        let w = self.width;
        if symmetric {
            let mags = self.magnitudes();
            let total: u64 = mags.iter().sum();
            let bins = mags.iter().enumerate().map(|(i, &c)| (i as f64 * w, c));
            let t = quantile(bins, w, q * total as f64).unwrap_or(mags.len() as f64 * w);
            return (-t, t);
        }
        let total: u64 = self.pos.iter().chain(&self.neg).sum();
        // Ascending order of x: negative bins from the most negative, then the positive ones.
        let ascending = || {
            let neg = (0..self.neg.len())
                .rev()
                .map(|i| (-((i + 1) as f64) * w, self.neg[i]));
            let pos = self.pos.iter().enumerate().map(|(i, &c)| (i as f64 * w, c));
            neg.chain(pos)
        };
        let top = self.pos.len() as f64 * w;
        let lo = quantile(ascending(), w, (1.0 - q) * total as f64).unwrap_or(top);
        let hi = quantile(ascending(), w, q * total as f64).unwrap_or(top);
        (lo, hi)
    }

    fn entropy(&self, levels: u32, symmetric: bool, zeros: u64) -> (f64, f64) {
        let w = self.width;
        let drop_zeros = |mut v: Vec<u64>| {
            if let Some(b) = v.first_mut() {
                *b = b.saturating_sub(zeros);
            }
            v
        };
        if !symmetric && !self.has_negatives() {
            // Non-negative data with a zero point at the bottom: the whole grid covers [0, T].
            let pos = trim(drop_zeros(self.pos.clone()));
            let i = kl_threshold(&pos, levels as usize);
            return (0.0, i as f64 * w);
        }
        // One side of a signed grid gets half the levels. Asymmetric signed data gets the same
        // threshold on both sides, each clamped to the observed extreme by the caller.
        let mags = drop_zeros(self.magnitudes());
        let t = kl_threshold(&mags, (levels as usize / 2).max(1)) as f64 * w;
        (-t, t)
    }

    fn mse(&self, levels: u32, symmetric: bool) -> (f64, f64) {
        let w = self.width;
        if symmetric {
            let t = mse_symmetric(&self.magnitudes(), levels) as f64 * w;
            return (-t, t);
        }
        let (jn, jp) = mse_asymmetric(&trim(self.neg.clone()), &trim(self.pos.clone()), levels);
        (-(jn as f64) * w, jp as f64 * w)
    }
}

/// In place: bin j becomes the sum of bins [j*f, (j+1)*f). Reads never hit an index already
/// written, since j*f >= j.
fn merge_bins(v: &mut [u64], f: usize) {
    let n = v.len();
    for j in 0..n {
        let start = j * f;
        v[j] = if start < n {
            v[start..(start + f).min(n)].iter().sum()
        } else {
            0
        };
    }
}

fn trim(mut v: Vec<u64>) -> Vec<u64> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// The value at cumulative count `target` over `(lower_edge, count)` bins in ascending order;
/// None when the target lies beyond all of them.
fn quantile(bins: impl Iterator<Item = (f64, u64)>, width: f64, target: f64) -> Option<f64> {
    let mut cum = 0.0;
    for (edge, count) in bins {
        if count == 0 {
            continue;
        }
        let c = count as f64;
        if cum + c >= target {
            let frac = ((target - cum) / c).clamp(0.0, 1.0);
            return Some(edge + frac * width);
        }
        cum += c;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// KL-divergence (entropy) threshold search

/// The bin count `i` whose upper edge is the threshold minimising KL(P||Q), where P is the
/// histogram cut at `i` with the clipped mass added to its last bin, and Q the same bins (without
/// that mass) quantized into `nq` levels and expanded back uniformly over their non-empty bins.
/// Empty bins of P or Q get the pseudo-count `KL_EPS` before normalising, so mass of P that Q
/// misses costs a large, finite penalty.
///
/// Closed form of the direct sum: with smoothed counts P_j, Q_j and totals sp, sq,
/// KL = (1/sp) * sum_j P_j ln(P_j / Q_j) + ln(sq / sp). Bins empty in both contribute nothing to
/// the sum, a non-empty bin j < i-1 contributes h_j ln h_j - h_j ln share(group of j), so with
/// prefix sums each candidate costs O(nq) instead of O(i).
fn kl_threshold(h: &[u64], nq: usize) -> usize {
    let nb = h.len();
    if nb <= nq {
        return nb; // The grid is finer than the histogram: nothing worth clipping.
    }
    // Prefix sums over bins [0, j): counts, non-empty bins, and h ln h.
    let (mut cnt, mut nz, mut hlh) = (vec![0u64; nb + 1], vec![0usize; nb + 1], vec![0.0; nb + 1]);
    for (j, &c) in h.iter().enumerate() {
        cnt[j + 1] = cnt[j] + c;
        nz[j + 1] = nz[j] + usize::from(c > 0);
        hlh[j + 1] = hlh[j] + x_ln_x(c);
    }
    let total = cnt[nb];
    let (mut best_kl, mut best_i) = (f64::INFINITY, nb);
    for i in nq..=nb {
        let last = i - 1;
        let (h_last, outliers) = (h[last], total - cnt[i]);
        // sum over groups of total_k * ln(share_k); the last group holds bin i-1.
        let mut mass_ln_share = 0.0;
        let mut last_share = 0.0;
        for k in 0..nq {
            let (s, e) = (k * i / nq, (k + 1) * i / nq);
            let (mass, nonzero) = (cnt[e] - cnt[s], nz[e] - nz[s]);
            if mass > 0 {
                let share = mass as f64 / nonzero as f64;
                mass_ln_share += mass as f64 * share.ln();
                last_share = share;
            }
        }
        let empty = (i - nz[i]) as f64;
        let sq = cnt[i] as f64 + KL_EPS * empty;
        let p_last = h_last + outliers;
        // The outliers fill P's last bin even where the histogram has none.
        let p_empty = empty - f64::from(u8::from(h_last == 0 && outliers > 0));
        let sp = (cnt[i] + outliers) as f64 + KL_EPS * p_empty;
        // Bins before the last one, then the last bin on its own.
        let mut sum = hlh[last] - mass_ln_share;
        let q_last = if h_last > 0 {
            sum += h_last as f64 * last_share.ln();
            last_share
        } else {
            KL_EPS
        };
        if p_last > 0 {
            sum += p_last as f64 * (p_last as f64 / q_last).ln();
        }
        let kl = sum / sp + (sq / sp).ln();
        if kl < best_kl {
            best_kl = kl;
            best_i = i;
        }
    }
    best_i
}

fn x_ln_x(c: u64) -> f64 {
    if c > 0 {
        c as f64 * (c as f64).ln()
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------
// MSE range search

/// Exact clipping cost of one histogram side in bin units, for every threshold edge `j`.
struct Tail {
    /// Suffix sums over bins b >= j of n_b, n_b*(2b+1) and n_b*(2b+1)^2.
    s0: Vec<u128>,
    s1: Vec<u128>,
    s2: Vec<u128>,
}

impl Tail {
    fn new(h: &[u64]) -> Tail {
        let n = h.len();
        let (mut s0, mut s1, mut s2) = (vec![0u128; n + 1], vec![0u128; n + 1], vec![0u128; n + 1]);
        for b in (0..n).rev() {
            let (c, m) = (u128::from(h[b]), 2 * b as u128 + 1);
            s0[b] = s0[b + 1] + c;
            s1[b] = s1[b + 1] + c * m;
            s2[b] = s2[b + 1] + c * m * m;
        }
        Tail { s0, s1, s2 }
    }

    fn total(&self) -> u128 {
        self.s0[0]
    }

    /// Sum over clipped bins of n_b * (center_b - j)^2, from 4x that = sum n_b (2b+1-2j)^2,
    /// evaluated exactly in integers.
    fn clip_error(&self, j: usize) -> f64 {
        let j = j as i128;
        let quad = self.s2[j as usize] as i128 - 4 * j * self.s1[j as usize] as i128
            + 4 * j * j * self.s0[j as usize] as i128;
        quad as f64 / 4.0
    }
}

/// Expected squared error in bin units: clipping of bins beyond the range plus uniform
/// rounding noise step^2/12 for every value inside.
fn mse_error(clip: f64, inside: u128, span_bins: usize, levels: u32) -> f64 {
    let step = span_bins as f64 / f64::from(levels - 1);
    clip + inside as f64 * step * step / 12.0
}

/// Candidate edges of one side: every bin edge, or 0 alone for an empty side.
fn candidates(nb: usize) -> std::ops::RangeInclusive<usize> {
    if nb == 0 {
        0..=0
    } else {
        1..=nb
    }
}

/// Threshold (in bins) of the symmetric range [-j*w, j*w] with minimal expected error.
fn mse_symmetric(mags: &[u64], levels: u32) -> usize {
    let tail = Tail::new(mags);
    let (mut best, mut best_err) = (mags.len(), f64::INFINITY);
    // From the top down with strict improvement: ties keep the wider range.
    for j in candidates(mags.len()).rev() {
        let err = mse_error(tail.clip_error(j), tail.total() - tail.s0[j], 2 * j, levels);
        if err < best_err {
            (best, best_err) = (j, err);
        }
    }
    best
}

/// Edges (jn, jp) of the range [-jn*w, jp*w] with minimal expected error, by alternating exact
/// 1-D minimisation over each side (the sides couple only through the step size).
fn mse_asymmetric(neg: &[u64], pos: &[u64], levels: u32) -> (usize, usize) {
    let (tn, tp) = (Tail::new(neg), Tail::new(pos));
    let total = tn.total() + tp.total();
    let err = |jn: usize, jp: usize| {
        let inside = total - tn.s0[jn] - tp.s0[jp];
        mse_error(
            tn.clip_error(jn) + tp.clip_error(jp),
            inside,
            jn + jp,
            levels,
        )
    };
    let argmin = |range: std::ops::RangeInclusive<usize>, f: &dyn Fn(usize) -> f64| {
        let (mut best, mut best_err) = (*range.end(), f64::INFINITY);
        for j in range.rev() {
            let e = f(j);
            if e < best_err {
                (best, best_err) = (j, e);
            }
        }
        best
    };
    let (mut jn, mut jp) = (neg.len(), pos.len());
    for _ in 0..MAX_DESCENT_ROUNDS {
        let new_jp = argmin(candidates(pos.len()), &|j| err(jn, j));
        let new_jn = argmin(candidates(neg.len()), &|j| err(j, new_jp));
        if (new_jn, new_jp) == (jn, jp) {
            break;
        }
        (jn, jp) = (new_jn, new_jp);
    }
    (jn, jp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a small deterministic generator, so tests need no extra dependency.
    struct Rng(u64);

    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }

        fn gaussian(&mut self) -> f32 {
            let (u, v) = (1.0 - self.uniform(), self.uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        }

        fn laplacian(&mut self) -> f32 {
            let u = self.uniform() - 0.5;
            (-u.signum() * (1.0 - 2.0 * u.abs()).ln()) as f32
        }
    }

    fn observed(kind: ObserverKind, batches: &[&[f32]]) -> Observer {
        let mut obs = Observer::new(kind);
        for b in batches {
            obs.observe(b).unwrap();
        }
        obs
    }

    fn width(obs: &Observer) -> f32 {
        obs.hist.as_ref().unwrap().width as f32
    }

    const ENTROPY: ObserverKind = ObserverKind::Entropy { bins: 2048 };
    const MSE: ObserverKind = ObserverKind::Mse { bins: 2048 };

    #[test]
    fn observer_minmax_is_exact() {
        let obs = observed(
            ObserverKind::MinMax,
            &[&[1.5, -2.0, 3.25], &[0.5, 7.0], &[]],
        );
        assert_eq!(obs.count(), 5);
        assert_eq!(obs.min_max(), Some((-2.0, 7.0)));
        assert_eq!(obs.range(256, false).unwrap(), (-2.0, 7.0));
        assert_eq!(obs.range(256, true).unwrap(), (-7.0, 7.0));
        // Zero is always inside the range.
        let pos = observed(ObserverKind::MinMax, &[&[1.0, 2.0, 3.0]]);
        assert_eq!(pos.range(256, false).unwrap(), (0.0, 3.0));
        let neg = observed(ObserverKind::MinMax, &[&[-4.0, -1.0]]);
        assert_eq!(neg.range(256, false).unwrap(), (-4.0, 0.0));
        assert_eq!(neg.range(256, true).unwrap(), (-4.0, 4.0));
    }

    #[test]
    fn observer_percentile_of_uniform_sequence() {
        let values: Vec<f32> = (-50_000..50_000).map(|i| i as f32).collect();
        let obs = observed(ObserverKind::Percentile(99.0), &[&values]);
        let w = width(&obs);
        assert!(w > 0.0 && w < 25.0, "bin width {w}");
        let (lo, hi) = obs.range(256, false).unwrap();
        // The 1st and 99th percentiles of -50000..49999 are about -49000 and 49000.
        assert!((lo + 49_000.0).abs() <= w, "lo {lo}, width {w}");
        assert!((hi - 49_000.0).abs() <= w, "hi {hi}, width {w}");
        // |x| holds 0 once and 1..=49999 twice: its 99th percentile is about 49500.
        let (slo, shi) = obs.range(256, true).unwrap();
        assert_eq!(slo, -shi);
        assert!((shi - 49_500.0).abs() <= w + 1.0, "hi {shi}, width {w}");
        // The 100th percentile is min-max exactly.
        let all = observed(ObserverKind::Percentile(100.0), &[&values]);
        assert_eq!(all.range(256, false).unwrap(), (-50_000.0, 49_999.0));
        assert_eq!(all.range(256, true).unwrap(), (-50_000.0, 50_000.0));
    }

    #[test]
    fn observer_percentile_ignores_batch_order_and_splitting() {
        let mut rng = Rng(7);
        let values: Vec<f32> = (0..60_000).map(|_| rng.gaussian() * 3.0 + 0.5).collect();
        let whole = observed(ObserverKind::Percentile(99.9), &[&values]);
        // Ascending |x| in small batches forces the histogram to widen many times.
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
        let mut split = Observer::new(ObserverKind::Percentile(99.9));
        for chunk in sorted.chunks(777) {
            split.observe(chunk).unwrap();
        }
        assert_eq!(split.count(), 60_000);
        assert_eq!(split.min_max(), whole.min_max());
        let h = split.hist.as_ref().unwrap();
        assert_eq!(
            h.pos.iter().chain(&h.neg).sum::<u64>(),
            60_000,
            "no value dropped"
        );
        let tol = width(&whole).max(width(&split));
        for symmetric in [false, true] {
            let (a, b) = (
                whole.range(256, symmetric).unwrap(),
                split.range(256, symmetric).unwrap(),
            );
            assert!(
                (a.0 - b.0).abs() <= tol && (a.1 - b.1).abs() <= tol,
                "{a:?} vs {b:?}"
            );
        }
        // Sanity against the exact order statistic: 99.9th percentile of x is near 0.5 + 3.09*3.
        let mut exact = values.clone();
        exact.sort_by(f32::total_cmp);
        let (_, hi) = whole.range(256, false).unwrap();
        assert!(
            (hi - exact[59_940]).abs() <= 2.0 * tol,
            "{hi} vs {}",
            exact[59_940]
        );
    }

    fn gaussian_with_outliers(rng: &mut Rng) -> Vec<f32> {
        let mut v: Vec<f32> = (0..100_000).map(|_| rng.gaussian()).collect();
        v.extend([40.0, -45.0, 50.0, -50.0]);
        v
    }

    #[test]
    fn observer_entropy_clips_long_tails() {
        let values = gaussian_with_outliers(&mut Rng(1));
        let obs = observed(ENTROPY, &[&values[..30_000], &values[30_000..]]);
        for symmetric in [true, false] {
            let (lo, hi) = obs.range(256, symmetric).unwrap();
            assert!(hi > 2.5 && hi < 25.0, "symmetric {symmetric}: hi {hi}");
            assert!(lo < -2.5 && lo > -25.0, "symmetric {symmetric}: lo {lo}");
        }
        // Non-negative data (a ReLU output) uses the whole grid on [0, T].
        let relu: Vec<f32> = values.iter().map(|v| v.max(0.0)).collect();
        let (lo, hi) = observed(ENTROPY, &[&relu]).range(256, false).unwrap();
        assert_eq!(lo, 0.0);
        assert!(hi > 2.5 && hi < 25.0, "relu hi {hi}");
    }

    #[test]
    fn observer_entropy_keeps_bounded_data() {
        // Uniform data has no tail to cut: the threshold stays near the maximum.
        let mut rng = Rng(3);
        let values: Vec<f32> = (0..100_000)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect();
        let (_, hi) = observed(ENTROPY, &[&values]).range(256, true).unwrap();
        assert!(hi > 0.9, "hi {hi}");
    }

    #[test]
    fn observer_mse_keeps_uniform_range() {
        let mut rng = Rng(5);
        let values: Vec<f32> = (0..100_000)
            .map(|_| (rng.uniform() * 4.0 - 1.0) as f32)
            .collect();
        let obs = observed(MSE, &[&values]);
        let (lo, hi) = obs.range(256, false).unwrap();
        assert!(lo < -0.95 && hi > 0.95 * 3.0, "({lo}, {hi})");
        let (_, shi) = obs.range(256, true).unwrap();
        assert!(shi > 0.95 * 3.0, "symmetric hi {shi}");
    }

    #[test]
    fn observer_mse_clips_laplacian_outliers() {
        // Laplacian(b=1), N = 1e6 values, plus one outlier per side. For 8 bits the symmetric
        // expected error 5.13e-6*N*T^2 + 2(100-T)^2 + 2N e^-T is smallest at T = 28.1.
        let mut rng = Rng(11);
        let mut values: Vec<f32> = (0..1_000_000).map(|_| rng.laplacian()).collect();
        values.extend([100.0, -100.0]);
        let obs = observed(MSE, &[&values]);
        let (_, shi) = obs.range(256, true).unwrap();
        assert!((shi - 28.1).abs() < 1.0, "symmetric hi {shi}");
        let (lo, hi) = obs.range(256, false).unwrap();
        assert!(
            lo < -20.0 && lo > -40.0 && hi > 20.0 && hi < 40.0,
            "({lo}, {hi})"
        );
    }

    #[test]
    fn observer_rejects_non_finite_values() {
        let mut obs = Observer::new(ENTROPY);
        obs.observe(&[1.0, 2.0]).unwrap();
        let err = obs.observe(&[3.0, f32::NAN]).unwrap_err().to_string();
        assert!(err.contains("NaN") && err.contains("position 1"), "{err}");
        let err = obs.observe(&[f32::NEG_INFINITY]).unwrap_err().to_string();
        assert!(err.contains("infinite"), "{err}");
        // A rejected batch leaves no trace.
        assert_eq!(obs.count(), 2);
        assert_eq!(obs.min_max(), Some((0.0f32.max(1.0), 2.0)));
    }

    #[test]
    fn observer_range_errors() {
        for kind in [
            ObserverKind::MinMax,
            ObserverKind::Percentile(99.9),
            ENTROPY,
            MSE,
        ] {
            let obs = Observer::new(kind);
            assert_eq!(obs.min_max(), None);
            let err = obs.range(256, false).unwrap_err().to_string();
            assert!(err.contains("no calibration data"), "{err}");
            let with_data = observed(kind, &[&[1.0]]);
            assert!(with_data.range(1, false).is_err());
        }
        for bad in [
            ObserverKind::Percentile(0.0),
            ObserverKind::Percentile(100.5),
            ObserverKind::Percentile(f64::NAN),
            ObserverKind::Entropy { bins: 0 },
            ObserverKind::Mse { bins: 1 << 30 },
        ] {
            let mut obs = Observer::new(bad);
            assert!(obs.observe(&[1.0]).is_err(), "{bad:?}");
            assert!(obs.range(256, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn observer_zero_data_gives_tiny_positive_range() {
        for kind in [
            ObserverKind::MinMax,
            ObserverKind::Percentile(99.0),
            ENTROPY,
            MSE,
        ] {
            let obs = observed(kind, &[&[0.0; 10], &[-0.0]]);
            let (lo, hi) = obs.range(256, false).unwrap();
            assert_eq!(lo, 0.0);
            assert!(hi > 0.0 && hi < 1e-30, "{kind:?}: {hi}");
            assert!(((hi - lo) / 255.0).is_normal());
            let (slo, shi) = obs.range(256, true).unwrap();
            assert!(slo == -shi && shi > 0.0 && ((shi - slo) / 255.0).is_normal());
        }
    }

    #[test]
    fn observer_histogram_grows_exactly() {
        // Zeros before the width is known, then ranges that widen by large factors.
        let obs = observed(
            ObserverKind::Percentile(100.0),
            &[&[0.0, 0.0], &[1e-3, -2e-3], &[5.0], &[-1e20, 3e25]],
        );
        let h = obs.hist.as_ref().unwrap();
        assert_eq!(h.pos.iter().chain(&h.neg).sum::<u64>(), 7);
        assert_eq!(h.neg.iter().sum::<u64>(), 2);
        assert!(h.width * PERCENTILE_BINS as f64 > 3e25);
        assert_eq!(obs.range(256, false).unwrap(), (-1e20, 3e25));
        // Merging sums groups of `f` bins in place.
        let mut v = vec![1, 2, 3, 4, 5, 6, 7];
        merge_bins(&mut v, 3);
        assert_eq!(v, [6, 15, 7, 0, 0, 0, 0]);
    }

    /// The KL search done the direct way, as the reference for the closed form.
    fn kl_threshold_direct(h: &[u64], nq: usize) -> usize {
        let nb = h.len();
        let smooth = |x: f64| if x > 0.0 { x } else { KL_EPS };
        let (mut best_kl, mut best_i) = (f64::INFINITY, nb);
        for i in nq..=nb {
            let outliers: u64 = h[i..].iter().sum();
            let mut p: Vec<f64> = h[..i].iter().map(|&c| c as f64).collect();
            p[i - 1] += outliers as f64;
            let mut q = vec![0.0; i];
            for k in 0..nq {
                let (s, e) = (k * i / nq, (k + 1) * i / nq);
                let mass: u64 = h[s..e].iter().sum();
                let nonzero = h[s..e].iter().filter(|&&c| c > 0).count();
                for j in s..e {
                    if h[j] > 0 {
                        q[j] = mass as f64 / nonzero as f64;
                    }
                }
            }
            let sp: f64 = p.iter().map(|&x| smooth(x)).sum();
            let sq: f64 = q.iter().map(|&x| smooth(x)).sum();
            let kl: f64 = (0..i)
                .map(|j| {
                    let (pj, qj) = (smooth(p[j]) / sp, smooth(q[j]) / sq);
                    pj * (pj / qj).ln()
                })
                .sum();
            if kl < best_kl {
                (best_kl, best_i) = (kl, i);
            }
        }
        best_i
    }

    #[test]
    fn observer_kl_closed_form_matches_direct_sum() {
        let mut rng = Rng(13);
        for case in 0..40 {
            let n = 20 + case * 3;
            // Decaying, gappy histograms with a few far outliers.
            let mut h: Vec<u64> = (0..n)
                .map(|j| {
                    let c = (1000.0 * (-(j as f64) / 8.0).exp() * rng.uniform()) as u64;
                    if rng.uniform() < 0.2 {
                        0
                    } else {
                        c
                    }
                })
                .collect();
            h.extend([0, 0, 1, 0, 2]);
            for nq in [2, 4, 8] {
                assert_eq!(
                    kl_threshold(&h, nq),
                    kl_threshold_direct(&h, nq),
                    "{h:?} nq {nq}"
                );
            }
        }
    }

    #[test]
    fn observer_search_helpers_on_hand_histograms() {
        // Clipping cost at edge 1 of bins {0: 1, 2: 2}: bin 2 has center 2.5, so 2 * 1.5^2.
        let tail = Tail::new(&[1, 0, 2]);
        assert_eq!(tail.clip_error(1), 4.5);
        assert_eq!(tail.clip_error(3), 0.0);
        assert_eq!(tail.clip_error(0), 0.25 + 2.0 * 6.25);
        // With as many levels as bins, nothing is lost and the full range wins.
        assert_eq!(kl_threshold(&[5, 1, 1, 3], 4), 4);
        // A far outlier after a jagged bulk: any range past the bulk merges its peaks and
        // valleys, so the threshold lands right after the bulk's 8 bins (with 8 levels).
        let mut h = [100, 1].repeat(4);
        h.extend(std::iter::repeat_n(0, 30));
        h.push(1);
        assert_eq!(kl_threshold(&h, 8), 8);
    }
}
