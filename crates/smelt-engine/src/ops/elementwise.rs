//! Elementwise ops: arithmetic, comparison, logic and bitwise binaries with numpy broadcasting,
//! unary math and activations, Clip, Where and Cast.
//!
//! Every binary goes through [`zip_broadcast`], which picks a loop without per-element index
//! math for the shapes real models produce (same shape, scalar, a bias row or per-channel
//! column) and falls back to a row-wise strided walk otherwise. Half-precision types compute
//! in f32.

use super::{input, opt_input, OpCtx, Registry};
use rayon::prelude::*;
use smelt_tensor::{
    bail, bf16, broadcast_shapes, broadcast_strides, dispatch, f16, BroadcastIter, DType, Data,
    Element, Error, Result, Tensor,
};

/// Tensors with at least this many elements are processed on several threads.
pub(crate) const PAR_MIN: usize = 1 << 16;
/// Elements per parallel task: large enough that scheduling costs nothing next to the work.
const CHUNK: usize = 1 << 14;

/// Runs `$body` for the numeric dtypes (every dtype but bool and string) with `$T` naming the
/// element type, which implements [`Num`]; anything else runs `$other`.
macro_rules! num_dispatch {
    ($data:expr, $T:ident, $v:ident => $body:expr, else => $other:expr) => {
        match $data {
            Data::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            Data::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            Data::F16($v) => {
                #[allow(dead_code)]
                type $T = f16;
                $body
            }
            Data::BF16($v) => {
                #[allow(dead_code)]
                type $T = bf16;
                $body
            }
            Data::I8($v) => {
                #[allow(dead_code)]
                type $T = i8;
                $body
            }
            Data::U8($v) => {
                #[allow(dead_code)]
                type $T = u8;
                $body
            }
            Data::I16($v) => {
                #[allow(dead_code)]
                type $T = i16;
                $body
            }
            Data::U16($v) => {
                #[allow(dead_code)]
                type $T = u16;
                $body
            }
            Data::I32($v) => {
                #[allow(dead_code)]
                type $T = i32;
                $body
            }
            Data::I64($v) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            Data::U32($v) => {
                #[allow(dead_code)]
                type $T = u32;
                $body
            }
            Data::U64($v) => {
                #[allow(dead_code)]
                type $T = u64;
                $body
            }
            _ => $other,
        }
    };
}
pub(crate) use num_dispatch;

/// Runs `$body` for the integer dtypes with `$T` naming the element type (implements [`Bits`]).
macro_rules! int_dispatch {
    ($data:expr, $T:ident, $v:ident => $body:expr, else => $other:expr) => {
        match $data {
            Data::I8($v) => {
                #[allow(dead_code)]
                type $T = i8;
                $body
            }
            Data::U8($v) => {
                #[allow(dead_code)]
                type $T = u8;
                $body
            }
            Data::I16($v) => {
                #[allow(dead_code)]
                type $T = i16;
                $body
            }
            Data::U16($v) => {
                #[allow(dead_code)]
                type $T = u16;
                $body
            }
            Data::I32($v) => {
                #[allow(dead_code)]
                type $T = i32;
                $body
            }
            Data::I64($v) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            Data::U32($v) => {
                #[allow(dead_code)]
                type $T = u32;
                $body
            }
            Data::U64($v) => {
                #[allow(dead_code)]
                type $T = u64;
                $body
            }
            _ => $other,
        }
    };
}

/// Maps every element of a float tensor through `$body` (with `$x` the element and `$F` its
/// compute type, f32 or f64; half types compute in f32). Evaluates to `Result<Tensor>`.
macro_rules! float_map {
    ($t:expr, $name:expr, $F:ident, $x:ident => $body:expr) => {{
        let t: &Tensor = $t;
        let data = match t.data() {
            Data::F32(v) => {
                #[allow(dead_code)]
                type $F = f32;
                Data::F32(map_slice(v, |$x: f32| $body))
            }
            Data::F64(v) => {
                #[allow(dead_code)]
                type $F = f64;
                Data::F64(map_slice(v, |$x: f64| $body))
            }
            Data::F16(v) => {
                #[allow(dead_code)]
                type $F = f32;
                Data::F16(map_slice(v, |h: f16| {
                    let $x = h.to_f32();
                    f16::from_f32($body)
                }))
            }
            Data::BF16(v) => {
                #[allow(dead_code)]
                type $F = f32;
                Data::BF16(map_slice(v, |h: bf16| {
                    let $x = h.to_f32();
                    bf16::from_f32($body)
                }))
            }
            _ => bail!(
                Unsupported,
                "{} needs a float tensor, got {}",
                $name,
                t.dtype()
            ),
        };
        Tensor::new(t.shape().to_vec(), data)
    }};
}

/// Registers a float-only unary op given as an expression of `x` (type `F`); `$ctx` names the
/// op context for reading attributes in `$setup`.
macro_rules! unary_float {
    ($r:expr, $op:literal, $x:ident => $body:expr) => {
        unary_float!($r, $op, |_ctx| _unused = {}, $x => $body)
    };
    ($r:expr, $op:literal, |$ctx:ident| $p:pat = $setup:block, $x:ident => $body:expr) => {
        $r.insert($op, |$ctx: &OpCtx, inputs: &[Option<&Tensor>]| {
            #[allow(clippy::let_unit_value)]
            let $p = $setup;
            let t = input(inputs, 0)?;
            Ok(vec![float_map!(t, $op, F, $x => $body)?])
        });
    };
}

/// Numeric element operations shared by the generic kernels. Integer arithmetic wraps, as
/// ONNX runtimes do; half types round through f32 per operation.
pub(crate) trait Num: Element {
    const FLOAT: bool;
    fn zero() -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// Integer division truncates; callers rule out a zero divisor first.
    fn div(self, o: Self) -> Self;
    /// Remainder with the sign of the dividend (C fmod).
    fn rem_trunc(self, o: Self) -> Self;
    /// Remainder with the sign of the divisor (Python %).
    fn rem_floor(self, o: Self) -> Self;
    /// Maximum; NaN wins, as numpy's maximum.
    fn max_(self, o: Self) -> Self;
    fn min_(self, o: Self) -> Self;
    fn abs_(self) -> Self;
    fn neg_(self) -> Self;
    fn sign_(self) -> Self;
    fn is_zero(self) -> bool;
}

macro_rules! num_float {
    ($t:ty) => {
        impl Num for $t {
            const FLOAT: bool = true;
            #[inline(always)]
            fn zero() -> Self {
                0.0
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline(always)]
            fn rem_trunc(self, o: Self) -> Self {
                self % o
            }
            #[inline(always)]
            fn rem_floor(self, o: Self) -> Self {
                let r = self % o;
                if r != 0.0 && ((r < 0.0) != (o < 0.0)) {
                    r + o
                } else {
                    r
                }
            }
            #[inline(always)]
            fn max_(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() {
                    <$t>::NAN
                } else if o > self {
                    o
                } else {
                    self
                }
            }
            #[inline(always)]
            fn min_(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() {
                    <$t>::NAN
                } else if o < self {
                    o
                } else {
                    self
                }
            }
            #[inline(always)]
            fn abs_(self) -> Self {
                self.abs()
            }
            #[inline(always)]
            fn neg_(self) -> Self {
                -self
            }
            #[inline(always)]
            fn sign_(self) -> Self {
                if self > 0.0 {
                    1.0
                } else if self < 0.0 {
                    -1.0
                } else {
                    self
                }
            }
            #[inline(always)]
            fn is_zero(self) -> bool {
                self == 0.0
            }
        }
    };
}
num_float!(f32);
num_float!(f64);

macro_rules! num_half {
    ($t:ty) => {
        impl Num for $t {
            const FLOAT: bool = true;
            fn zero() -> Self {
                <$t>::ZERO
            }
            fn add(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32() + o.to_f32())
            }
            fn sub(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32() - o.to_f32())
            }
            fn mul(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32() * o.to_f32())
            }
            fn div(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32() / o.to_f32())
            }
            fn rem_trunc(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32().rem_trunc(o.to_f32()))
            }
            fn rem_floor(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32().rem_floor(o.to_f32()))
            }
            fn max_(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32().max_(o.to_f32()))
            }
            fn min_(self, o: Self) -> Self {
                <$t>::from_f32(self.to_f32().min_(o.to_f32()))
            }
            fn abs_(self) -> Self {
                <$t>::from_f32(self.to_f32().abs())
            }
            fn neg_(self) -> Self {
                -self
            }
            fn sign_(self) -> Self {
                <$t>::from_f32(self.to_f32().sign_())
            }
            fn is_zero(self) -> bool {
                self.to_f32() == 0.0
            }
        }
    };
}
num_half!(f16);
num_half!(bf16);

macro_rules! num_int {
    ($t:ty, $signed:expr) => {
        impl Num for $t {
            const FLOAT: bool = false;
            #[inline(always)]
            fn zero() -> Self {
                0
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                if o == 0 {
                    0
                } else {
                    self.wrapping_div(o)
                }
            }
            #[inline(always)]
            fn rem_trunc(self, o: Self) -> Self {
                if o == 0 {
                    0
                } else {
                    self.wrapping_rem(o)
                }
            }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn rem_floor(self, o: Self) -> Self {
                let r = self.rem_trunc(o);
                if r != 0 && ((r < 0) != (o < 0)) {
                    r.wrapping_add(o)
                } else {
                    r
                }
            }
            #[inline(always)]
            fn max_(self, o: Self) -> Self {
                Ord::max(self, o)
            }
            #[inline(always)]
            fn min_(self, o: Self) -> Self {
                Ord::min(self, o)
            }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn abs_(self) -> Self {
                if self < 0 {
                    self.wrapping_neg()
                } else {
                    self
                }
            }
            #[inline(always)]
            fn neg_(self) -> Self {
                self.wrapping_neg()
            }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn sign_(self) -> Self {
                if self > 0 {
                    1
                } else if self < 0 {
                    (0 as $t).wrapping_sub(1)
                } else {
                    0
                }
            }
            #[inline(always)]
            fn is_zero(self) -> bool {
                self == 0
            }
        }
    };
}
num_int!(i8, true);
num_int!(u8, false);
num_int!(i16, true);
num_int!(u16, false);
num_int!(i32, true);
num_int!(i64, true);
num_int!(u32, false);
num_int!(u64, false);

/// Bitwise operations on the integer types.
trait Bits: Num {
    fn and(self, o: Self) -> Self;
    fn or(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    fn not(self) -> Self;
    /// Shifts by `o` bits; shifting out every bit gives 0.
    fn shl(self, o: Self) -> Self;
    fn shr(self, o: Self) -> Self;
}

macro_rules! bits {
    ($t:ty) => {
        impl Bits for $t {
            #[inline(always)]
            fn and(self, o: Self) -> Self {
                self & o
            }
            #[inline(always)]
            fn or(self, o: Self) -> Self {
                self | o
            }
            #[inline(always)]
            fn xor(self, o: Self) -> Self {
                self ^ o
            }
            #[inline(always)]
            fn not(self) -> Self {
                !self
            }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn shl(self, o: Self) -> Self {
                if o < 0 || o as u64 >= <$t>::BITS as u64 {
                    0
                } else {
                    self << o
                }
            }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn shr(self, o: Self) -> Self {
                if o < 0 || o as u64 >= <$t>::BITS as u64 {
                    0
                } else {
                    self >> o
                }
            }
        }
    };
}
bits!(i8);
bits!(u8);
bits!(i16);
bits!(u16);
bits!(i32);
bits!(i64);
bits!(u32);
bits!(u64);

// ---------------------------------------------------------------------------------------------
// Loops

/// `f` over every element of `x`, on several threads when `x` is large.
pub(crate) fn map_slice<T, U, F>(x: &[T], f: F) -> Vec<U>
where
    T: Copy + Sync,
    U: Copy + Default + Send,
    F: Fn(T) -> U + Sync,
{
    if x.len() < PAR_MIN {
        return x.iter().map(|&v| f(v)).collect();
    }
    let mut out = vec![U::default(); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, i)| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = f(v);
            }
        });
    out
}

fn zip_same<A, B, U, F>(a: &[A], b: &[B], f: &F) -> Vec<U>
where
    A: Copy + Sync,
    B: Copy + Sync,
    U: Copy + Default + Send,
    F: Fn(A, B) -> U + Sync,
{
    let mut out = vec![U::default(); a.len()];
    let body = |o: &mut [U], x: &[A], y: &[B]| {
        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
            *o = f(x, y);
        }
    };
    if a.len() < PAR_MIN {
        body(&mut out, a, b);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| body(o, x, y));
    }
    out
}

/// Where a smaller operand's data sits inside the output: with the output viewed as
/// `[outer, mid, inner]`, the operand has shape `[1, mid, 1]` (its non-1 dims are one block
/// that matches the output). Covers scalars, bias rows and per-channel columns.
fn block_of(small: &[usize], out: &[usize]) -> Option<(usize, usize, usize)> {
    let r = out.len();
    let off = r - small.len();
    let pad = |i: usize| if i < off { 1 } else { small[i - off] };
    let first = (0..r).find(|&i| pad(i) != 1).unwrap_or(r);
    let last = (0..r).rev().find(|&i| pad(i) != 1).map_or(first, |i| i + 1);
    if (first..last).any(|i| pad(i) != out[i]) {
        return None;
    }
    let outer = out[..first].iter().product();
    let mid = out[first..last].iter().product();
    let inner = out[last..].iter().product();
    Some((outer, mid, inner))
}

/// `out[o, m, i] = f(full[o, m, i], part[m])` for a `part` broadcast as `block_of` describes.
fn zip_block<A, B, U, F>(full: &[A], part: &[B], mid: usize, inner: usize, f: F) -> Vec<U>
where
    A: Copy + Sync,
    B: Copy + Sync,
    U: Copy + Default + Send,
    F: Fn(A, B) -> U + Sync,
{
    let n = full.len();
    let mut out = vec![U::default(); n];
    if n == 0 {
        return out;
    }
    if inner == 1 {
        // Rows of `mid` elements, each combined with the whole of `part`.
        let rows_per_task = (CHUNK / mid).max(1);
        let body = |o: &mut [U], x: &[A]| {
            for (o, x) in o.chunks_mut(mid).zip(x.chunks(mid)) {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(part) {
                    *o = f(x, y);
                }
            }
        };
        if n < PAR_MIN {
            body(&mut out, full);
        } else {
            out.par_chunks_mut(rows_per_task * mid)
                .zip(full.par_chunks(rows_per_task * mid))
                .for_each(|(o, x)| body(o, x));
        }
    } else {
        // Runs of `inner` elements sharing one value of `part`.
        let runs_per_task = (CHUNK / inner).max(1);
        let body = |first_run: usize, o: &mut [U], x: &[A]| {
            for (k, (o, x)) in o.chunks_mut(inner).zip(x.chunks(inner)).enumerate() {
                let y = part[(first_run + k) % mid];
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = f(x, y);
                }
            }
        };
        if n < PAR_MIN {
            body(0, &mut out, full);
        } else {
            out.par_chunks_mut(runs_per_task * inner)
                .zip(full.par_chunks(runs_per_task * inner))
                .enumerate()
                .for_each(|(t, (o, x))| body(t * runs_per_task, o, x));
        }
    }
    out
}

/// `f` over the numpy broadcast of `a` (shape `ash`) and `b` (shape `bsh`): the output shape
/// and values.
pub(crate) fn zip_broadcast<A, B, U, F>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    f: F,
) -> Result<(Vec<usize>, Vec<U>)>
where
    A: Copy + Sync,
    B: Copy + Sync,
    U: Copy + Default + Send,
    F: Fn(A, B) -> U + Sync,
{
    let shape = broadcast_shapes(ash, bsh)?;
    let n: usize = shape.iter().product();
    if a.len() == n && b.len() == n {
        return Ok((shape, zip_same(a, b, &f)));
    }
    if a.len() == n {
        if b.len() == 1 {
            let y = b[0];
            return Ok((shape, map_slice(a, |x| f(x, y))));
        }
        if let Some((_, mid, inner)) = block_of(bsh, &shape) {
            return Ok((shape, zip_block(a, b, mid, inner, f)));
        }
    }
    if b.len() == n {
        if a.len() == 1 {
            let x = a[0];
            return Ok((shape, map_slice(b, |y| f(x, y))));
        }
        if let Some((_, mid, inner)) = block_of(ash, &shape) {
            return Ok((shape, zip_block(b, a, mid, inner, |y, x| f(x, y))));
        }
    }
    let r = shape.len();
    let sa = broadcast_strides(ash, &shape);
    let sb = broadcast_strides(bsh, &shape);
    // Both operands broadcast but share full trailing dims (an attention mask [B,1,S,S] added
    // to scores [B,H,S,S]): contiguous runs in both, walked in parallel.
    let full = |sh: &[usize], i: usize| {
        let off = r - sh.len();
        i >= off && sh[i - off] == shape[i]
    };
    let split = (0..r)
        .rev()
        .find(|&i| !(full(ash, i) && full(bsh, i)))
        .map_or(0, |i| i + 1);
    let run: usize = shape[split..].iter().product();
    if run >= 64 && n >= PAR_MIN {
        let starts = |st: &[usize]| -> Vec<usize> {
            BroadcastIter::new(&shape[..split], st[..split].to_vec(), 0).collect()
        };
        let (ra, rb) = (starts(&sa), starts(&sb));
        let per_task = (CHUNK / run).max(1);
        let mut out = vec![U::default(); n];
        out.par_chunks_mut(per_task * run)
            .enumerate()
            .for_each(|(t, o)| {
                for (k, o) in o.chunks_mut(run).enumerate() {
                    let (x, y) = (ra[t * per_task + k], rb[t * per_task + k]);
                    for ((o, &p), &q) in o.iter_mut().zip(&a[x..x + run]).zip(&b[y..y + run]) {
                        *o = f(p, q);
                    }
                }
            });
        return Ok((shape, out));
    }
    // Otherwise walk output rows, each a strided run in both inputs.
    let len = shape[r - 1];
    let (ia, ib) = (sa[r - 1], sb[r - 1]);
    let mut out = Vec::with_capacity(n);
    if len > 0 {
        let rows_a = BroadcastIter::new(&shape[..r - 1], sa[..r - 1].to_vec(), 0);
        let rows_b = BroadcastIter::new(&shape[..r - 1], sb[..r - 1].to_vec(), 0);
        for (oa, ob) in rows_a.zip(rows_b) {
            for k in 0..len {
                out.push(f(a[oa + k * ia], b[ob + k * ib]));
            }
        }
    }
    Ok((shape, out))
}

// ---------------------------------------------------------------------------------------------
// Binary ops

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bin {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    ModTrunc,
    ModFloor,
}

fn same_dtype(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!(
            Shape,
            "operands must have the same dtype, got {} and {}",
            a.dtype(),
            b.dtype()
        );
    }
    Ok(())
}

fn mismatch(a: &Tensor, b: &Tensor) -> Error {
    Error::Shape(format!(
        "operands must have the same dtype, got {} and {}",
        a.dtype(),
        b.dtype()
    ))
}

fn bin_kernel<T: Num>(
    x: &[T],
    xs: &[usize],
    y: &[T],
    ys: &[usize],
    op: Bin,
) -> Result<(Vec<usize>, Vec<T>)> {
    if !T::FLOAT
        && matches!(op, Bin::Div | Bin::ModTrunc | Bin::ModFloor)
        && y.iter().any(|v| v.is_zero())
    {
        bail!(Input, "integer division by zero");
    }
    match op {
        Bin::Add => zip_broadcast(x, xs, y, ys, T::add),
        Bin::Sub => zip_broadcast(x, xs, y, ys, T::sub),
        Bin::Mul => zip_broadcast(x, xs, y, ys, T::mul),
        Bin::Div => zip_broadcast(x, xs, y, ys, T::div),
        Bin::Max => zip_broadcast(x, xs, y, ys, T::max_),
        Bin::Min => zip_broadcast(x, xs, y, ys, T::min_),
        Bin::ModTrunc => zip_broadcast(x, xs, y, ys, T::rem_trunc),
        Bin::ModFloor => zip_broadcast(x, xs, y, ys, T::rem_floor),
    }
}

fn arith(a: &Tensor, b: &Tensor, op: Bin) -> Result<Tensor> {
    same_dtype(a, b)?;
    num_dispatch!(a.data(), T, x => {
        let y = T::slice(b.data()).ok_or_else(|| mismatch(a, b))?;
        let (shape, v) = bin_kernel::<T>(x, a.shape(), y, b.shape(), op)?;
        Tensor::new(shape, T::wrap(v))
    }, else => bail!(Unsupported, "{:?} is not defined for {} tensors", op, a.dtype()))
}

fn binary(inputs: &[Option<&Tensor>], op: Bin) -> Result<Vec<Tensor>> {
    Ok(vec![arith(input(inputs, 0)?, input(inputs, 1)?, op)?])
}

fn op_add(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    binary(i, Bin::Add)
}
fn op_sub(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    binary(i, Bin::Sub)
}
fn op_mul(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    binary(i, Bin::Mul)
}
fn op_div(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    binary(i, Bin::Div)
}

fn op_mod(ctx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let op = if ctx.int("fmod", 0)? != 0 {
        Bin::ModTrunc
    } else {
        Bin::ModFloor
    };
    binary(i, op)
}

/// Folds a variadic op (Sum, Max, Min) pairwise, broadcasting as it goes.
fn variadic(inputs: &[Option<&Tensor>], op: Bin) -> Result<Tensor> {
    let mut it = inputs.iter();
    let mut acc = match it.next().copied().flatten() {
        Some(t) => t.clone(),
        None => bail!(Invalid, "needs at least one input"),
    };
    for t in it {
        match t {
            Some(t) => acc = arith(&acc, t, op)?,
            None => bail!(Invalid, "inputs of a variadic op cannot be omitted"),
        }
    }
    Ok(acc)
}

fn op_sum(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![variadic(i, Bin::Add)?])
}
fn op_max(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![variadic(i, Bin::Max)?])
}
fn op_min(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![variadic(i, Bin::Min)?])
}
fn op_mean(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let sum = variadic(i, Bin::Add)?;
    let n = i.len();
    Ok(vec![float_map!(&sum, "Mean", F, x => x / n as F)?])
}

/// Exact integer power with wrapping; a negative exponent truncates 1/b^n toward zero.
fn int_pow(base: i128, exp: i64) -> i128 {
    if exp < 0 {
        return match base {
            1 => 1,
            -1 => {
                if exp % 2 == 0 {
                    1
                } else {
                    -1
                }
            }
            _ => 0,
        };
    }
    let (mut b, mut e, mut acc) = (base, exp as u64, 1i128);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(b);
        }
        b = b.wrapping_mul(b);
        e >>= 1;
    }
    acc
}

/// Pow: the output has the base's dtype; the exponent may be any numeric dtype.
fn op_pow(_: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let b = input(inputs, 1)?;
    if let (Data::F32(x), Data::F32(y)) = (a.data(), b.data()) {
        let (shape, v) = if b.numel() == 1 && y[0] == 2.0 {
            (
                broadcast_shapes(a.shape(), b.shape())?,
                map_slice(x, |v| v * v),
            )
        } else {
            zip_broadcast(x, a.shape(), y, b.shape(), f32::powf)?
        };
        return Ok(vec![Tensor::from_vec(shape, v)?]);
    }
    if b.dtype() == DType::Bool || b.dtype() == DType::Str {
        bail!(Unsupported, "Pow exponent cannot be {}", b.dtype());
    }
    let out = if b.dtype().is_int() {
        let e = b.to_i64_vec()?;
        num_dispatch!(a.data(), T, x => {
            let (shape, v) = zip_broadcast(x, a.shape(), &e, b.shape(), |x: T, e: i64| {
                if T::FLOAT {
                    T::from_f64(x.to_f64().powf(e as f64))
                } else {
                    T::from_i128(int_pow(x.to_i128(), e))
                }
            })?;
            Tensor::new(shape, T::wrap(v))?
        }, else => bail!(Unsupported, "Pow base cannot be {}", a.dtype()))
    } else {
        let e = b.to_f64_vec()?;
        num_dispatch!(a.data(), T, x => {
            let (shape, v) = zip_broadcast(x, a.shape(), &e, b.shape(), |x: T, e: f64| {
                T::from_f64(x.to_f64().powf(e))
            })?;
            Tensor::new(shape, T::wrap(v))?
        }, else => bail!(Unsupported, "Pow base cannot be {}", a.dtype()))
    };
    Ok(vec![out])
}

#[derive(Clone, Copy)]
enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

fn compare(inputs: &[Option<&Tensor>], op: Cmp) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let b = input(inputs, 1)?;
    same_dtype(a, b)?;
    if let (Data::Str(x), Data::Str(y)) = (a.data(), b.data()) {
        if !matches!(op, Cmp::Eq) {
            bail!(Unsupported, "strings can only be compared for equality");
        }
        let shape = broadcast_shapes(a.shape(), b.shape())?;
        let v: Vec<bool> = BroadcastIter::broadcast(a.shape(), &shape)
            .zip(BroadcastIter::broadcast(b.shape(), &shape))
            .map(|(i, j)| x[i] == y[j])
            .collect();
        return Ok(vec![Tensor::from_vec(shape, v)?]);
    }
    fn run<T: Element>(
        x: &[T],
        xs: &[usize],
        y: &[T],
        ys: &[usize],
        op: Cmp,
    ) -> Result<(Vec<usize>, Vec<bool>)> {
        match op {
            Cmp::Eq => zip_broadcast(x, xs, y, ys, |a, b| a == b),
            Cmp::Lt => zip_broadcast(x, xs, y, ys, |a, b| a < b),
            Cmp::Le => zip_broadcast(x, xs, y, ys, |a, b| a <= b),
            Cmp::Gt => zip_broadcast(x, xs, y, ys, |a, b| a > b),
            Cmp::Ge => zip_broadcast(x, xs, y, ys, |a, b| a >= b),
        }
    }
    let (shape, v) = dispatch!(a.data(), T, x => {
        let y = T::slice(b.data()).ok_or_else(|| mismatch(a, b))?;
        run::<T>(x, a.shape(), y, b.shape(), op)?
    });
    Ok(vec![Tensor::from_vec(shape, v)?])
}

fn op_equal(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    compare(i, Cmp::Eq)
}
fn op_less(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    compare(i, Cmp::Lt)
}
fn op_less_equal(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    compare(i, Cmp::Le)
}
fn op_greater(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    compare(i, Cmp::Gt)
}
fn op_greater_equal(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    compare(i, Cmp::Ge)
}

fn logic(inputs: &[Option<&Tensor>], f: fn(bool, bool) -> bool) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let b = input(inputs, 1)?;
    let (Data::Bool(x), Data::Bool(y)) = (a.data(), b.data()) else {
        bail!(
            Unsupported,
            "logical ops need bool tensors, got {} and {}",
            a.dtype(),
            b.dtype()
        );
    };
    let (shape, v) = zip_broadcast(x, a.shape(), y, b.shape(), f)?;
    Ok(vec![Tensor::from_vec(shape, v)?])
}

fn op_and(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    logic(i, |a, b| a & b)
}
fn op_or(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    logic(i, |a, b| a | b)
}
fn op_xor(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    logic(i, |a, b| a ^ b)
}
fn op_not(_: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let Data::Bool(x) = a.data() else {
        bail!(Unsupported, "Not needs a bool tensor, got {}", a.dtype());
    };
    Ok(vec![Tensor::from_vec(
        a.shape().to_vec(),
        map_slice(x, |v| !v),
    )?])
}

#[derive(Clone, Copy)]
enum BitOp {
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

fn bitwise(inputs: &[Option<&Tensor>], op: BitOp) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let b = input(inputs, 1)?;
    same_dtype(a, b)?;
    fn run<T: Bits>(
        x: &[T],
        xs: &[usize],
        y: &[T],
        ys: &[usize],
        op: BitOp,
    ) -> Result<(Vec<usize>, Vec<T>)> {
        match op {
            BitOp::And => zip_broadcast(x, xs, y, ys, T::and),
            BitOp::Or => zip_broadcast(x, xs, y, ys, T::or),
            BitOp::Xor => zip_broadcast(x, xs, y, ys, T::xor),
            BitOp::Shl => zip_broadcast(x, xs, y, ys, T::shl),
            BitOp::Shr => zip_broadcast(x, xs, y, ys, T::shr),
        }
    }
    let out = int_dispatch!(a.data(), T, x => {
        let y = T::slice(b.data()).ok_or_else(|| mismatch(a, b))?;
        let (shape, v) = run::<T>(x, a.shape(), y, b.shape(), op)?;
        Tensor::new(shape, T::wrap(v))?
    }, else => bail!(Unsupported, "bitwise ops need integer tensors, got {}", a.dtype()));
    Ok(vec![out])
}

fn op_bitwise_and(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    bitwise(i, BitOp::And)
}
fn op_bitwise_or(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    bitwise(i, BitOp::Or)
}
fn op_bitwise_xor(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    bitwise(i, BitOp::Xor)
}
fn op_bitshift(ctx: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    match ctx.string("direction", "")?.as_str() {
        "LEFT" => bitwise(i, BitOp::Shl),
        "RIGHT" => bitwise(i, BitOp::Shr),
        d => bail!(
            Invalid,
            "BitShift direction must be LEFT or RIGHT, got {d:?}"
        ),
    }
}
fn op_bitwise_not(_: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(inputs, 0)?;
    let out = int_dispatch!(a.data(), T, x => {
        Tensor::new(a.shape().to_vec(), T::wrap(map_slice(x, T::not)))?
    }, else => bail!(Unsupported, "BitwiseNot needs an integer tensor, got {}", a.dtype()));
    Ok(vec![out])
}

/// PRelu: the slope broadcasts to the input's shape (unidirectionally).
fn op_prelu(_: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(inputs, 0)?;
    let s = input(inputs, 1)?;
    same_dtype(x, s)?;
    let out = num_dispatch!(x.data(), T, xv => {
        let sv = T::slice(s.data()).ok_or_else(|| mismatch(x, s))?;
        let (shape, v) = zip_broadcast(xv, x.shape(), sv, s.shape(), |a: T, k: T| {
            if a < T::zero() { a.mul(k) } else { a }
        })?;
        if shape != x.shape() {
            bail!(Shape, "PRelu slope {:?} does not broadcast to input {:?}", s.shape(), x.shape());
        }
        Tensor::new(shape, T::wrap(v))?
    }, else => bail!(Unsupported, "PRelu is not defined for {}", x.dtype()));
    Ok(vec![out])
}

// ---------------------------------------------------------------------------------------------
// Unary ops on any numeric type

fn num_unary(
    inputs: &[Option<&Tensor>],
    name: &str,
    f: fn(&Tensor) -> Result<Data>,
) -> Result<Vec<Tensor>> {
    let t = input(inputs, 0)?;
    let data = f(t).map_err(|e| e.context(name))?;
    Ok(vec![Tensor::new(t.shape().to_vec(), data)?])
}

fn op_abs(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    num_unary(i, "Abs", |t| {
        Ok(
            num_dispatch!(t.data(), T, v => T::wrap(map_slice(v, T::abs_)),
            else => bail!(Unsupported, "not defined for {}", t.dtype())),
        )
    })
}
fn op_neg(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    num_unary(i, "Neg", |t| {
        Ok(
            num_dispatch!(t.data(), T, v => T::wrap(map_slice(v, T::neg_)),
            else => bail!(Unsupported, "not defined for {}", t.dtype())),
        )
    })
}
fn op_sign(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    num_unary(i, "Sign", |t| {
        Ok(
            num_dispatch!(t.data(), T, v => T::wrap(map_slice(v, T::sign_)),
            else => bail!(Unsupported, "not defined for {}", t.dtype())),
        )
    })
}
fn op_relu(_: &OpCtx, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    num_unary(i, "Relu", |t| {
        Ok(
            num_dispatch!(t.data(), T, v => T::wrap(map_slice(v, |x: T| if x < T::zero() { T::zero() } else { x })),
            else => bail!(Unsupported, "not defined for {}", t.dtype())),
        )
    })
}

fn op_shrink(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let bias = ctx.float("bias", 0.0)? as f64;
    let lambd = ctx.float("lambd", 0.5)? as f64;
    let t = input(inputs, 0)?;
    let data = num_dispatch!(t.data(), T, v => T::wrap(map_slice(v, |x: T| {
        let f = x.to_f64();
        T::from_f64(if f < -lambd { f + bias } else if f > lambd { f - bias } else { 0.0 })
    })), else => bail!(Unsupported, "Shrink is not defined for {}", t.dtype()));
    Ok(vec![Tensor::new(t.shape().to_vec(), data)?])
}

/// Reads Clip's optional bound input, a one-element tensor of the input's dtype.
fn clip_bound<T: Element>(t: Option<&Tensor>, which: &str) -> Result<Option<T>> {
    let Some(t) = t else { return Ok(None) };
    if t.numel() != 1 {
        bail!(
            Shape,
            "Clip {which} must be a scalar, got shape {:?}",
            t.shape()
        );
    }
    let v = t
        .as_slice::<T>()
        .map_err(|e| e.context(format!("Clip {which}")))?;
    Ok(Some(v[0]))
}

/// Clip: bounds are attributes before opset 11 and optional scalar inputs from then on. With
/// min > max every element becomes max, as numpy's clip does.
fn op_clip(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(inputs, 0)?;
    let data = num_dispatch!(t.data(), T, v => {
        let (lo, hi) = if ctx.opset < 11 {
            if !T::FLOAT {
                bail!(Unsupported, "Clip before opset 11 needs a float tensor, got {}", t.dtype());
            }
            let lo = ctx.node.attr_float("min")?.map(|m| T::from_f64(m as f64));
            let hi = ctx.node.attr_float("max")?.map(|m| T::from_f64(m as f64));
            (lo, hi)
        } else {
            (clip_bound::<T>(opt_input(inputs, 1), "min")?, clip_bound::<T>(opt_input(inputs, 2), "max")?)
        };
        T::wrap(map_slice(v, |x: T| {
            let mut y = x;
            if let Some(l) = lo {
                if y < l {
                    y = l;
                }
            }
            if let Some(h) = hi {
                if y > h {
                    y = h;
                }
            }
            y
        }))
    }, else => bail!(Unsupported, "Clip is not defined for {}", t.dtype()));
    Ok(vec![Tensor::new(t.shape().to_vec(), data)?])
}

// ---------------------------------------------------------------------------------------------
// Float predicates

fn float_pred(t: &Tensor, name: &str, f: impl Fn(f64) -> bool + Sync) -> Result<Tensor> {
    let v = match t.data() {
        Data::F32(v) => map_slice(v, |x| f(x as f64)),
        Data::F64(v) => map_slice(v, &f),
        Data::F16(v) => map_slice(v, |x| f(x.to_f64())),
        Data::BF16(v) => map_slice(v, |x| f(x.to_f64())),
        _ => bail!(
            Unsupported,
            "{name} needs a float tensor, got {}",
            t.dtype()
        ),
    };
    Tensor::from_vec(t.shape().to_vec(), v)
}

fn op_isnan(_: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Ok(vec![float_pred(input(inputs, 0)?, "IsNaN", f64::is_nan)?])
}

fn op_isinf(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let pos = ctx.int("detect_positive", 1)? != 0;
    let neg = ctx.int("detect_negative", 1)? != 0;
    Ok(vec![float_pred(input(inputs, 0)?, "IsInf", |x| {
        (pos && x == f64::INFINITY) || (neg && x == f64::NEG_INFINITY)
    })?])
}

// ---------------------------------------------------------------------------------------------
// Erf

// Chebyshev-economised polynomial fits, highest degree first, computed for smelt with mpmath
// (50-digit arithmetic). ERF_SMALL: erf(x)/x as a function of t = 2x^2 - 1 for |x| <= 1. The
// ERFC_* tables: erfc(x)*exp(x^2) on [1,2], [2,3.5] and [3.5,6], each over its interval mapped
// to t in [-1, 1]. Fit errors are below 3e-16 (relative to the fitted function).
const ERF_SMALL: [f64; 12] = [
    -3.80659122412214e-13,
    9.21125018742823e-12,
    -2.035231956483527e-10,
    4.115751500265885e-09,
    -7.51156925108609e-08,
    1.2233827638093572e-06,
    -1.75371694412802e-05,
    0.00021751715603563488,
    -0.0022854855611440855,
    0.019852496688984218,
    -0.1405360890227171,
    0.9654687386698673,
];
const ERFC_1_2: [f64; 16] = [
    -1.5053845831299624e-12,
    1.100964212179346e-11,
    -7.259519499451313e-11,
    5.033420569164749e-10,
    -3.40590129634009e-09,
    2.2329527918697295e-08,
    -1.4191188983511488e-07,
    8.723039535796884e-07,
    -5.171328661078072e-06,
    2.9470857585360663e-05,
    -0.00016081117337237463,
    0.0008360838095501772,
    -0.0041163631624454335,
    0.019037759963870138,
    -0.08181145886628004,
    0.3215854164543175,
];
const ERFC_2_35: [f64; 16] = [
    -5.385460413068287e-12,
    3.2417475610132607e-11,
    -1.7015215137129228e-10,
    9.830016377967729e-10,
    -5.602221787184144e-09,
    3.108847874611232e-08,
    -1.6874296710210136e-07,
    8.950228299200691e-07,
    -4.631705362630414e-06,
    2.3347542710787384e-05,
    -0.0001144271539438872,
    0.0005440864558202282,
    -0.0025035488002965733,
    0.011114208555372547,
    -0.04742822817047613,
    0.19366209627906866,
];
const ERFC_35_6: [f64; 16] = [
    -2.8909737719322116e-11,
    1.4058893079595e-10,
    -5.60488457625219e-10,
    2.6522897803391296e-09,
    -1.2588105380341456e-08,
    5.8168940800310296e-08,
    -2.6520596222668634e-07,
    1.1938181646711683e-06,
    -5.3003687010150365e-06,
    2.319761488732145e-05,
    -0.0001000237460414767,
    0.0004246296480552603,
    -0.001773630658265737,
    0.007283322451542246,
    -0.0293793107477039,
    0.11630270721024713,
];

#[inline(always)]
fn horner(c: &[f64], t: f64) -> f64 {
    c.iter().fold(0.0, |acc, &k| acc * t + k)
}

/// The error function, accurate to a few ulps of f64 (far beyond what f32 needs).
pub(crate) fn erf(x: f64) -> f64 {
    let a = x.abs();
    if a <= 1.0 {
        return x * horner(&ERF_SMALL, 2.0 * a * a - 1.0);
    }
    let r = if a < 2.0 {
        1.0 - (-a * a).exp() * horner(&ERFC_1_2, 2.0 * a - 3.0)
    } else if a < 3.5 {
        1.0 - (-a * a).exp() * horner(&ERFC_2_35, (2.0 * a - 5.5) / 1.5)
    } else if a < 6.0 {
        1.0 - (-a * a).exp() * horner(&ERFC_35_6, (2.0 * a - 9.5) / 2.5)
    } else if a.is_nan() {
        return x;
    } else {
        1.0
    };
    r.copysign(x)
}

// ---------------------------------------------------------------------------------------------
// Where, Cast

/// Where: picks from X or Y by a bool condition, all three broadcast together.
fn op_where(_: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let c = input(inputs, 0)?;
    let x = input(inputs, 1)?;
    let y = input(inputs, 2)?;
    let Data::Bool(cv) = c.data() else {
        bail!(Shape, "Where condition must be bool, got {}", c.dtype());
    };
    same_dtype(x, y)?;
    let shape = broadcast_shapes(&broadcast_shapes(c.shape(), x.shape())?, y.shape())?;
    let n: usize = shape.iter().product();
    if cv.len() == n && x.numel() == n && y.numel() == n {
        let data = dispatch!(x.data(), T, xv => {
            let yv = T::slice(y.data()).ok_or_else(|| mismatch(x, y))?;
            T::wrap(cv.iter().zip(xv).zip(yv).map(|((&c, &a), &b)| if c { a } else { b }).collect())
        }, str => {
            let (Data::Str(xv), Data::Str(yv)) = (x.data(), y.data()) else { return Err(mismatch(x, y)) };
            Data::Str(cv.iter().zip(xv).zip(yv).map(|((&c, a), b)| if c { a.clone() } else { b.clone() }).collect())
        });
        return Ok(vec![Tensor::new(shape, data)?]);
    }
    // Each operand whole or one value (Where(IsNaN(p), 0, p) after a softmax): in parallel.
    let whole_or_one = |len: usize| len == n || len == 1;
    if n >= PAR_MIN && whole_or_one(cv.len()) && whole_or_one(x.numel()) && whole_or_one(y.numel())
    {
        let data = num_dispatch!(x.data(), T, xv => {
            let yv = T::slice(y.data()).ok_or_else(|| mismatch(x, y))?;
            Some(T::wrap(select(cv, xv, yv, n)))
        }, else => None);
        if let Some(data) = data {
            return Ok(vec![Tensor::new(shape, data)?]);
        }
    }
    // Walk the output row by row (rows = all but the last axis): the outer offsets come from
    // an odometer per input, the inner loop is a plain stride (0 or 1) walk.
    let rank = shape.len();
    let last = if rank == 0 { 1 } else { shape[rank - 1] };
    let outer = if rank == 0 {
        &[][..]
    } else {
        &shape[..rank - 1]
    };
    let strides = |s: &[usize]| smelt_tensor::broadcast_strides(s, &shape);
    let (cs, xs, ys) = (strides(c.shape()), strides(x.shape()), strides(y.shape()));
    let inner = |st: &[usize]| if rank == 0 { 0 } else { st[rank - 1] };
    let (ci, xi, yi) = (inner(&cs), inner(&xs), inner(&ys));
    let rows = |st: &[usize]| BroadcastIter::new(outer, st[..rank.saturating_sub(1)].to_vec(), 0);
    let bases: Vec<(usize, usize, usize)> = rows(&cs)
        .zip(rows(&xs))
        .zip(rows(&ys))
        .map(|((a, b), c)| (a, b, c))
        .collect();
    let data = dispatch!(x.data(), T, xv => {
        let yv = T::slice(y.data()).ok_or_else(|| mismatch(x, y))?;
        let mut out: Vec<T> = Vec::with_capacity(n);
        for &(cb, xb, yb) in &bases {
            out.extend((0..last).map(|j| if cv[cb + j * ci] { xv[xb + j * xi] } else { yv[yb + j * yi] }));
        }
        T::wrap(out)
    }, str => {
        let (Data::Str(xv), Data::Str(yv)) = (x.data(), y.data()) else { return Err(mismatch(x, y)) };
        let mut out = Vec::with_capacity(n);
        for &(cb, xb, yb) in &bases {
            out.extend((0..last).map(|j| if cv[cb + j * ci] { xv[xb + j * xi].clone() } else { yv[yb + j * yi].clone() }));
        }
        Data::Str(out)
    });
    Ok(vec![Tensor::new(shape, data)?])
}

/// `out[i] = c[i] ? x[i] : y[i]` over `n` elements, where an operand of one value stands for all.
fn select<T: Copy + Default + Send + Sync>(c: &[bool], x: &[T], y: &[T], n: usize) -> Vec<T> {
    #[inline(always)]
    fn at<V: Copy>(v: &[V], i: usize) -> V {
        if v.len() == 1 {
            v[0]
        } else {
            v[i]
        }
    }
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(t, o)| {
        let base = t * CHUNK;
        for (k, o) in o.iter_mut().enumerate() {
            let i = base + k;
            *o = if at(c, i) { at(x, i) } else { at(y, i) };
        }
    });
    out
}

fn op_cast(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let Some(to) = ctx.node.attr_int("to")? else {
        bail!(Invalid, "Cast needs a 'to' attribute");
    };
    let Some(dt) = DType::from_onnx(to as i32) else {
        bail!(
            Unsupported,
            "Cast to ONNX element type {to} is not supported"
        );
    };
    Ok(vec![input(inputs, 0)?.cast(dt)?])
}

fn op_cast_like(_: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let like = input(inputs, 1)?;
    Ok(vec![input(inputs, 0)?.cast(like.dtype())?])
}

// ---------------------------------------------------------------------------------------------

/// Selu's constants as ONNX defines them (already rounded to f32).
const SELU_ALPHA: f32 = 1.673_263_2;
const SELU_GAMMA: f32 = 1.050_701;

pub fn register(r: &mut Registry) {
    r.insert("Add", op_add);
    r.insert("Sub", op_sub);
    r.insert("Mul", op_mul);
    r.insert("Div", op_div);
    r.insert("Pow", op_pow);
    r.insert("Mod", op_mod);
    r.insert("Max", op_max);
    r.insert("Min", op_min);
    r.insert("Sum", op_sum);
    r.insert("Mean", op_mean);
    r.insert("Equal", op_equal);
    r.insert("Less", op_less);
    r.insert("LessOrEqual", op_less_equal);
    r.insert("Greater", op_greater);
    r.insert("GreaterOrEqual", op_greater_equal);
    r.insert("And", op_and);
    r.insert("Or", op_or);
    r.insert("Xor", op_xor);
    r.insert("Not", op_not);
    r.insert("BitShift", op_bitshift);
    r.insert("BitwiseAnd", op_bitwise_and);
    r.insert("BitwiseOr", op_bitwise_or);
    r.insert("BitwiseXor", op_bitwise_xor);
    r.insert("BitwiseNot", op_bitwise_not);
    r.insert("PRelu", op_prelu);

    r.insert("Abs", op_abs);
    r.insert("Neg", op_neg);
    r.insert("Sign", op_sign);
    r.insert("Relu", op_relu);
    r.insert("Shrink", op_shrink);
    r.insert("Clip", op_clip);
    r.insert("IsNaN", op_isnan);
    r.insert("IsInf", op_isinf);
    r.insert("Where", op_where);
    r.insert("Cast", op_cast);
    r.insert("CastLike", op_cast_like);

    unary_float!(r, "Exp", x => x.exp());
    unary_float!(r, "Log", x => x.ln());
    unary_float!(r, "Sqrt", x => x.sqrt());
    unary_float!(r, "Reciprocal", x => 1.0 / x);
    unary_float!(r, "Floor", x => x.floor());
    unary_float!(r, "Ceil", x => x.ceil());
    unary_float!(r, "Round", x => x.round_ties_even());
    unary_float!(r, "Sin", x => x.sin());
    unary_float!(r, "Cos", x => x.cos());
    unary_float!(r, "Tan", x => x.tan());
    unary_float!(r, "Asin", x => x.asin());
    unary_float!(r, "Acos", x => x.acos());
    unary_float!(r, "Atan", x => x.atan());
    unary_float!(r, "Sinh", x => x.sinh());
    unary_float!(r, "Cosh", x => x.cosh());
    unary_float!(r, "Asinh", x => x.asinh());
    unary_float!(r, "Acosh", x => x.acosh());
    unary_float!(r, "Atanh", x => x.atanh());
    unary_float!(r, "Tanh", x => x.tanh());
    r.insert("Erf", |_: &OpCtx, inputs: &[Option<&Tensor>]| {
        let t = input(inputs, 0)?;
        if let Ok(x) = t.as_slice::<f32>() {
            let mut out = vec![0f32; x.len()];
            crate::kernels::erf::erf(x, &mut out);
            return Ok(vec![Tensor::from_vec(t.shape().to_vec(), out)?]);
        }
        Ok(vec![float_map!(t, "Erf", F, x => erf(x as f64) as F)?])
    });
    unary_float!(r, "Sigmoid", x => 1.0 / (1.0 + (-x).exp()));
    unary_float!(r, "Softsign", x => x / (1.0 + x.abs()));
    unary_float!(r, "Softplus", x => softplus(x as f64) as F);
    unary_float!(r, "Mish", x => (x as f64 * softplus(x as f64).tanh()) as F);
    unary_float!(r, "HardSwish", x => x * (x / 6.0 + 0.5).clamp(0.0, 1.0));
    unary_float!(r, "LeakyRelu", |ctx| alpha = { ctx.float("alpha", 0.01)? }, x => {
        if x < 0.0 { x * alpha as F } else { x }
    });
    unary_float!(r, "ThresholdedRelu", |ctx| alpha = { ctx.float("alpha", 1.0)? }, x => {
        if x > alpha as F { x } else { 0.0 }
    });
    unary_float!(r, "Elu", |ctx| alpha = { ctx.float("alpha", 1.0)? }, x => {
        if x < 0.0 { alpha as F * x.exp_m1() } else { x }
    });
    unary_float!(r, "Celu", |ctx| alpha = { ctx.float("alpha", 1.0)? }, x => {
        let a = alpha as F;
        if x < 0.0 { a * (x / a).exp_m1() } else { x }
    });
    unary_float!(r, "Selu", |ctx| (alpha, gamma) = { (ctx.float("alpha", SELU_ALPHA)?, ctx.float("gamma", SELU_GAMMA)?) }, x => {
        let (a, g) = (alpha as F, gamma as F);
        if x > 0.0 { g * x } else { g * a * x.exp_m1() }
    });
    unary_float!(r, "HardSigmoid", |ctx| (alpha, beta) = { (ctx.float("alpha", 0.2)?, ctx.float("beta", 0.5)?) }, x => {
        (alpha as F * x + beta as F).clamp(0.0, 1.0)
    });
    r.insert("Gelu", |ctx: &OpCtx, inputs: &[Option<&Tensor>]| {
        let t = input(inputs, 0)?;
        if let (Ok(x), "none") = (
            t.as_slice::<f32>(),
            ctx.string("approximate", "none")?.as_str(),
        ) {
            let mut out = vec![0f32; x.len()];
            crate::kernels::erf::gelu(x, &mut out);
            return Ok(vec![Tensor::from_vec(t.shape().to_vec(), out)?]);
        }
        gelu_generic(ctx, inputs)
    });
}

/// Gelu for every float type and both forms (the f32 exact form has a kernel).
fn gelu_generic(ctx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let tanh = match ctx.string("approximate", "none")?.as_str() {
        "none" => false,
        "tanh" => true,
        a => bail!(Invalid, "Gelu approximate must be none or tanh, got {a:?}"),
    };
    let t = input(inputs, 0)?;
    Ok(vec![float_map!(t, "Gelu", F, x => {
        let v = x as f64;
        let inner = if tanh {
            ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh()
        } else {
            erf(v * std::f64::consts::FRAC_1_SQRT_2)
        };
        (0.5 * v * (1.0 + inner)) as F
    })?])
}

/// ln(1 + e^x) without overflow for large x.
#[inline(always)]
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{lookup, OpCtx};
    use super::*;
    use smelt_ir::{Attr, Node};

    fn run_op(
        op: &str,
        attrs: &[(&str, Attr)],
        opset: i64,
        inputs: &[Option<&Tensor>],
    ) -> Result<Vec<Tensor>> {
        let mut node = Node::new(op, "t", &[], &[]);
        for (k, v) in attrs {
            node = node.with_attr(k, v.clone());
        }
        let ctx = OpCtx::new(&node, opset);
        let f = lookup("", op).expect("op is registered");
        f(&ctx, inputs)
    }

    fn run1(op: &str, attrs: &[(&str, Attr)], inputs: &[&Tensor]) -> Tensor {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        run_op(op, attrs, 17, &ins).unwrap().remove(0)
    }

    fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w}");
        }
    }

    #[test]
    fn add_broadcasts_every_shape_pattern() {
        let a = f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        // Bias row.
        let out = run1("Add", &[], &[&a, &f32t(&[3], &[10., 20., 30.])]);
        assert_eq!(out.shape(), &[2, 3]);
        assert_eq!(
            out.as_slice::<f32>().unwrap(),
            &[11., 22., 33., 14., 25., 36.]
        );
        // Per-row column, on the left.
        let out = run1("Sub", &[], &[&f32t(&[2, 1], &[100., 200.]), &a]);
        assert_eq!(
            out.as_slice::<f32>().unwrap(),
            &[99., 98., 97., 196., 195., 194.]
        );
        // Scalar.
        let out = run1("Mul", &[], &[&a, &Tensor::scalar(2.0f32)]);
        assert_eq!(out.as_slice::<f32>().unwrap(), &[2., 4., 6., 8., 10., 12.]);
        // Both sides broadcast: outer sum.
        let out = run1(
            "Add",
            &[],
            &[&f32t(&[2, 1], &[1., 2.]), &f32t(&[1, 3], &[10., 20., 30.])],
        );
        assert_eq!(out.shape(), &[2, 3]);
        assert_eq!(
            out.as_slice::<f32>().unwrap(),
            &[11., 21., 31., 12., 22., 32.]
        );
        // Per-channel [C,1] against [N,C,W] (inner runs).
        let x = f32t(&[2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
        let out = run1("Mul", &[], &[&x, &f32t(&[2, 1], &[10., -1.])]);
        assert_eq!(
            out.as_slice::<f32>().unwrap(),
            &[10., 20., -3., -4., 50., 60., -7., -8.]
        );
        // Incompatible shapes fail.
        let ins = [Some(&a), Some(&x)];
        assert!(run_op("Add", &[], 17, &ins).is_err());
        // Mismatched dtypes fail.
        let i = Tensor::from_vec(vec![3], vec![1i32, 2, 3]).unwrap();
        assert!(run_op("Add", &[], 17, &[Some(&a), Some(&i)]).is_err());
    }

    #[test]
    fn large_broadcasts_match_a_plain_loop() {
        // Big enough for the parallel paths.
        let (n, c, hw) = (3, 5, 9000);
        let x: Vec<f32> = (0..n * c * hw).map(|i| (i % 97) as f32 * 0.5).collect();
        let xt = f32t(&[n, c, hw], &x);
        let ch = f32t(&[c, 1], &[1., 2., 3., 4., 5.]);
        let row: Vec<f32> = (0..hw).map(|i| i as f32).collect();
        let rt = f32t(&[hw], &row);
        let by_ch = run1("Mul", &[], &[&xt, &ch]);
        let by_row = run1("Add", &[], &[&rt, &xt]);
        let same = run1("Sub", &[], &[&xt, &xt]);
        let (a, b, s) = (
            by_ch.as_slice::<f32>().unwrap(),
            by_row.as_slice::<f32>().unwrap(),
            same.as_slice::<f32>().unwrap(),
        );
        for i in 0..x.len() {
            let ci = (i / hw) % c;
            assert_eq!(a[i], x[i] * (ci + 1) as f32, "channel mul at {i}");
            assert_eq!(b[i], x[i] + (i % hw) as f32, "row add at {i}");
            assert_eq!(s[i], 0.0);
        }
    }

    #[test]
    fn integer_division_truncates_and_mod_follows_fmod() {
        let a = Tensor::from_vec(vec![4], vec![7i32, -7, 7, -7]).unwrap();
        let b = Tensor::from_vec(vec![4], vec![2i32, 2, -2, -2]).unwrap();
        let q = run1("Div", &[], &[&a, &b]);
        assert_eq!(q.as_slice::<i32>().unwrap(), &[3, -3, -3, 3]);
        let m = run1(
            "Mod",
            &[],
            &[
                &a,
                &Tensor::from_vec(vec![4], vec![3i32, 3, -3, -3]).unwrap(),
            ],
        );
        assert_eq!(m.as_slice::<i32>().unwrap(), &[1, 2, -2, -1]);
        let m = run1(
            "Mod",
            &[("fmod", Attr::Int(1))],
            &[
                &a,
                &Tensor::from_vec(vec![4], vec![3i32, 3, -3, -3]).unwrap(),
            ],
        );
        assert_eq!(m.as_slice::<i32>().unwrap(), &[1, -1, 1, -1]);
        let fm = run1(
            "Mod",
            &[("fmod", Attr::Int(1))],
            &[&f32t(&[2], &[-4.5, 5.5]), &f32t(&[2], &[2.0, -2.0])],
        );
        assert_close(fm.as_slice::<f32>().unwrap(), &[-0.5, 1.5], 1e-6);
        let z = Tensor::from_vec(vec![4], vec![1i32, 0, 1, 1]).unwrap();
        assert!(run_op("Div", &[], 17, &[Some(&a), Some(&z)]).is_err());
        // Wrapping instead of overflow panics.
        let big = Tensor::from_vec(vec![1], vec![i8::MIN]).unwrap();
        let neg1 = Tensor::from_vec(vec![1], vec![-1i8]).unwrap();
        assert_eq!(
            run1("Div", &[], &[&big, &neg1]).as_slice::<i8>().unwrap(),
            &[i8::MIN]
        );
        let u = Tensor::from_vec(vec![2], vec![250u8, 10]).unwrap();
        assert_eq!(
            run1("Add", &[], &[&u, &u]).as_slice::<u8>().unwrap(),
            &[244, 20]
        );
    }

    #[test]
    fn round_is_half_to_even() {
        let x = f32t(&[8], &[0.5, 1.5, 2.5, -0.5, -1.5, 2.4, 2.6, -2.5]);
        let out = run1("Round", &[], &[&x]);
        assert_eq!(
            out.as_slice::<f32>().unwrap(),
            &[0., 2., 2., -0., -2., 2., 3., -2.]
        );
    }

    #[test]
    fn erf_matches_reference_values() {
        // (x, erf(x)) from 30-digit mpmath.
        let known = [
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (0.999, 0.8422852702064969),
            (1.001, 0.8431154854780762),
            (1.5, 0.9661051464753108),
            (1.999, 0.9953015566513705),
            (2.0, 0.9953222650189527),
            (2.001, 0.9953428907185247),
            (2.5, 0.999593047982555),
            (3.0, 0.9999779095030014),
            (3.49, 0.9999992009745795),
            (3.51, 0.9999993090477225),
            (4.0, 0.9999999845827421),
            (5.5, 0.9999999999999927),
            (-0.3, -0.3286267594591274),
            (-1.2, -0.9103139782296353),
        ];
        for &(x, want) in &known {
            let got = erf(x);
            assert!((got - want).abs() < 1e-15, "erf({x}) = {got}, want {want}");
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(-f64::INFINITY), -1.0);
        assert!(erf(f64::NAN).is_nan());
        let xs: Vec<f32> = known.iter().map(|k| k.0 as f32).collect();
        let out = run1("Erf", &[], &[&f32t(&[xs.len()], &xs)]);
        for (&g, &(x, _)) in out.as_slice::<f32>().unwrap().iter().zip(&known) {
            // Compare against the exact erf of the f32-rounded input, to f32 precision.
            let want = erf(x as f32 as f64);
            assert!((g as f64 - want).abs() < 1e-7, "f32 erf({x}) = {g}");
        }
    }

    #[test]
    fn activations_match_hand_values() {
        let x = f32t(&[2], &[1.0, -0.5]);
        let g = run1("Gelu", &[], &[&x]);
        assert_close(
            g.as_slice::<f32>().unwrap(),
            &[0.841_344_7, -0.154_268_77],
            1e-6,
        );
        let g = run1(
            "Gelu",
            &[("approximate", Attr::String(b"tanh".to_vec()))],
            &[&f32t(&[1], &[1.0])],
        );
        assert_close(g.as_slice::<f32>().unwrap(), &[0.841_192], 1e-6);
        let one = f32t(&[1], &[1.0]);
        assert_close(
            run1("Sigmoid", &[], &[&one]).as_slice::<f32>().unwrap(),
            &[0.731_058_6],
            1e-6,
        );
        assert_close(
            run1("Softplus", &[], &[&one]).as_slice::<f32>().unwrap(),
            &[1.313_261_7],
            1e-6,
        );
        assert_close(
            run1("Mish", &[], &[&one]).as_slice::<f32>().unwrap(),
            &[0.865_098_4],
            1e-6,
        );
        let big = f32t(&[2], &[1000.0, -1000.0]);
        assert_eq!(
            run1("Softplus", &[], &[&big]).as_slice::<f32>().unwrap(),
            &[1000.0, 0.0]
        );
        assert_eq!(
            run1("Sigmoid", &[], &[&big]).as_slice::<f32>().unwrap(),
            &[1.0, 0.0]
        );
        let x = f32t(&[4], &[-2.0, -0.5, 0.5, 4.0]);
        let lr = run1("LeakyRelu", &[("alpha", Attr::Float(0.1))], &[&x]);
        assert_close(
            lr.as_slice::<f32>().unwrap(),
            &[-0.2, -0.05, 0.5, 4.0],
            1e-7,
        );
        let hs = run1("HardSigmoid", &[], &[&x]);
        assert_close(hs.as_slice::<f32>().unwrap(), &[0.1, 0.4, 0.6, 1.0], 1e-7);
        let hw = run1("HardSwish", &[], &[&x]);
        assert_close(
            hw.as_slice::<f32>().unwrap(),
            &[-2.0 / 6.0, -0.5 * 2.5 / 6.0, 0.5 * 3.5 / 6.0, 4.0],
            1e-6,
        );
        let sh = run1(
            "Shrink",
            &[("lambd", Attr::Float(1.0)), ("bias", Attr::Float(0.5))],
            &[&x],
        );
        assert_close(sh.as_slice::<f32>().unwrap(), &[-1.5, 0.0, 0.0, 3.5], 1e-7);
        let ir = run1(
            "Relu",
            &[],
            &[&Tensor::from_vec(vec![3], vec![-3i64, 0, 5]).unwrap()],
        );
        assert_eq!(ir.as_slice::<i64>().unwrap(), &[0, 0, 5]);
        // Half types compute in f32 and round back.
        let h = Tensor::from_vec(vec![1], vec![f16::from_f32(1.0)]).unwrap();
        let e = run1("Exp", &[], &[&h]);
        assert_eq!(
            e.as_slice::<f16>().unwrap(),
            &[f16::from_f32(std::f32::consts::E)]
        );
        // Integer tensors are refused by float-only ops.
        let i = Tensor::from_vec(vec![1], vec![1i32]).unwrap();
        assert!(run_op("Exp", &[], 17, &[Some(&i)]).is_err());
    }

    #[test]
    fn pow_mixes_dtypes() {
        let base = Tensor::from_vec(vec![3], vec![1i32, 2, 3]).unwrap();
        let ef = f32t(&[3], &[4.0, 5.0, 6.0]);
        assert_eq!(
            run1("Pow", &[], &[&base, &ef]).as_slice::<i32>().unwrap(),
            &[1, 32, 729]
        );
        let ei = Tensor::from_vec(vec![3], vec![4i64, 5, 6]).unwrap();
        assert_eq!(
            run1("Pow", &[], &[&base, &ei]).as_slice::<i32>().unwrap(),
            &[1, 32, 729]
        );
        let fb = f32t(&[3], &[1.0, 2.0, 3.0]);
        assert_eq!(
            run1("Pow", &[], &[&fb, &ei]).as_slice::<f32>().unwrap(),
            &[1.0, 32.0, 729.0]
        );
        let p = run1("Pow", &[], &[&fb, &Tensor::scalar(2.0f32)]);
        assert_eq!(p.as_slice::<f32>().unwrap(), &[1.0, 4.0, 9.0]);
        let p = run1("Pow", &[], &[&fb, &Tensor::scalar(0.5f32)]);
        assert_close(
            p.as_slice::<f32>().unwrap(),
            &[1.0, std::f32::consts::SQRT_2, 3f32.sqrt()],
            1e-6,
        );
        assert_eq!(int_pow(2, -1), 0);
        assert_eq!(int_pow(-1, -3), -1);
        assert_eq!(int_pow(-3, 3), -27);
    }

    #[test]
    fn comparisons_logic_and_bits() {
        let a = f32t(&[2, 2], &[1., 2., 3., 4.]);
        let b = f32t(&[2], &[2., 3.]);
        let want_lt = [true, true, false, false];
        assert_eq!(
            run1("Less", &[], &[&a, &b]).as_slice::<bool>().unwrap(),
            &want_lt
        );
        assert_eq!(
            run1("GreaterOrEqual", &[], &[&a, &b])
                .as_slice::<bool>()
                .unwrap(),
            &[false, false, true, true]
        );
        assert_eq!(
            run1("Equal", &[], &[&a, &b]).as_slice::<bool>().unwrap(),
            &[false, false, false, false]
        );
        assert_eq!(
            run1("LessOrEqual", &[], &[&a, &b])
                .as_slice::<bool>()
                .unwrap(),
            &[true, true, false, false]
        );
        let s1 = Tensor::new(vec![2], Data::Str(vec!["a".into(), "b".into()])).unwrap();
        let s2 = Tensor::new(vec![], Data::Str(vec!["b".into()])).unwrap();
        assert_eq!(
            run1("Equal", &[], &[&s1, &s2]).as_slice::<bool>().unwrap(),
            &[false, true]
        );
        let p = Tensor::from_vec(vec![4], vec![true, true, false, false]).unwrap();
        let q = Tensor::from_vec(vec![4], vec![true, false, true, false]).unwrap();
        assert_eq!(
            run1("And", &[], &[&p, &q]).as_slice::<bool>().unwrap(),
            &[true, false, false, false]
        );
        assert_eq!(
            run1("Or", &[], &[&p, &q]).as_slice::<bool>().unwrap(),
            &[true, true, true, false]
        );
        assert_eq!(
            run1("Xor", &[], &[&p, &q]).as_slice::<bool>().unwrap(),
            &[false, true, true, false]
        );
        assert_eq!(
            run1("Not", &[], &[&p]).as_slice::<bool>().unwrap(),
            &[false, false, true, true]
        );
        let x = Tensor::from_vec(vec![3], vec![16u8, 4, 1]).unwrap();
        let s = Tensor::from_vec(vec![3], vec![1u8, 2, 9]).unwrap();
        let right = [("direction", Attr::String(b"RIGHT".to_vec()))];
        let left = [("direction", Attr::String(b"LEFT".to_vec()))];
        assert_eq!(
            run1("BitShift", &right, &[&x, &s])
                .as_slice::<u8>()
                .unwrap(),
            &[8, 1, 0]
        );
        assert_eq!(
            run1("BitShift", &left, &[&x, &s]).as_slice::<u8>().unwrap(),
            &[32, 16, 0]
        );
        let i = Tensor::from_vec(vec![2], vec![0b1100i32, -1]).unwrap();
        let j = Tensor::from_vec(vec![2], vec![0b1010i32, 5]).unwrap();
        assert_eq!(
            run1("BitwiseAnd", &[], &[&i, &j])
                .as_slice::<i32>()
                .unwrap(),
            &[0b1000, 5]
        );
        assert_eq!(
            run1("BitwiseXor", &[], &[&i, &j])
                .as_slice::<i32>()
                .unwrap(),
            &[0b0110, -6]
        );
        assert_eq!(
            run1("BitwiseNot", &[], &[&i]).as_slice::<i32>().unwrap(),
            &[-13, 0]
        );
    }

    #[test]
    fn variadic_ops() {
        let a = f32t(&[2], &[1., 5.]);
        let b = f32t(&[2], &[4., 2.]);
        let c = f32t(&[1], &[3.]);
        assert_eq!(
            run1("Sum", &[], &[&a, &b, &c]).as_slice::<f32>().unwrap(),
            &[8., 10.]
        );
        assert_eq!(
            run1("Max", &[], &[&a, &b, &c]).as_slice::<f32>().unwrap(),
            &[4., 5.]
        );
        assert_eq!(
            run1("Min", &[], &[&a, &b, &c]).as_slice::<f32>().unwrap(),
            &[1., 2.]
        );
        assert_eq!(
            run1("Mean", &[], &[&a, &b, &c]).as_slice::<f32>().unwrap(),
            &[8. / 3., 10. / 3.]
        );
        assert_eq!(
            run1("Max", &[], &[&a]).as_slice::<f32>().unwrap(),
            &[1., 5.]
        );
        let nan = f32t(&[2], &[f32::NAN, 0.0]);
        assert!(run1("Max", &[], &[&a, &nan]).as_slice::<f32>().unwrap()[0].is_nan());
    }

    #[test]
    fn clip_by_attribute_and_by_input() {
        let x = f32t(&[4], &[-3., -1., 1., 3.]);
        let attrs = [("min", Attr::Float(-2.0)), ("max", Attr::Float(2.0))];
        let out = run_op("Clip", &attrs, 6, &[Some(&x)]).unwrap();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[-2., -1., 1., 2.]);
        let lo = Tensor::scalar(0.0f32);
        let out = run_op("Clip", &[], 13, &[Some(&x), Some(&lo), None]).unwrap();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[0., 0., 1., 3.]);
        let xi = Tensor::from_vec(vec![4], vec![-3i8, -1, 1, 3]).unwrap();
        let hi = Tensor::scalar(0i8);
        let out = run_op("Clip", &[], 13, &[Some(&xi), None, Some(&hi)]).unwrap();
        assert_eq!(out[0].as_slice::<i8>().unwrap(), &[-3, -1, 0, 0]);
        // min > max: everything becomes max.
        let out = run_op(
            "Clip",
            &[],
            13,
            &[
                Some(&x),
                Some(&Tensor::scalar(2.0f32)),
                Some(&Tensor::scalar(1.0f32)),
            ],
        )
        .unwrap();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1., 1., 1., 1.]);
        // A bound of the wrong dtype is an error, not a panic.
        assert!(run_op("Clip", &[], 13, &[Some(&xi), Some(&lo)]).is_err());
    }

    #[test]
    fn where_prelu_and_cast() {
        let c = Tensor::from_vec(vec![2, 1], vec![true, false]).unwrap();
        let x = f32t(&[1, 3], &[1., 2., 3.]);
        let y = Tensor::scalar(-1.0f32);
        let out = run1("Where", &[], &[&c, &x, &y]);
        assert_eq!(out.shape(), &[2, 3]);
        assert_eq!(out.as_slice::<f32>().unwrap(), &[1., 2., 3., -1., -1., -1.]);
        let c2 = Tensor::from_vec(vec![3], vec![false, true, false]).unwrap();
        let out = run1(
            "Where",
            &[],
            &[&c2, &f32t(&[3], &[1., 2., 3.]), &f32t(&[3], &[4., 5., 6.])],
        );
        assert_eq!(out.as_slice::<f32>().unwrap(), &[4., 2., 6.]);

        let x = f32t(&[1, 2, 2], &[-1., 2., -3., 4.]);
        let slope = f32t(&[2, 1], &[0.5, 0.25]);
        let out = run1("PRelu", &[], &[&x, &slope]);
        assert_eq!(out.as_slice::<f32>().unwrap(), &[-0.5, 2., -0.75, 4.]);

        let out = run1(
            "Cast",
            &[("to", Attr::Int(7))],
            &[&f32t(&[3], &[1.7, -1.7, 3.0])],
        );
        assert_eq!(out.as_slice::<i64>().unwrap(), &[1, -1, 3]);
        let like = Tensor::scalar(0u8);
        let out = run1(
            "CastLike",
            &[],
            &[&Tensor::from_vec(vec![2], vec![1i32, 300]).unwrap(), &like],
        );
        assert_eq!(out.as_slice::<u8>().unwrap(), &[1, 44]);
        assert!(run_op("Cast", &[("to", Attr::Int(17))], 19, &[Some(&like)]).is_err());
    }

    #[test]
    fn isnan_isinf() {
        let x = f32t(&[4], &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0]);
        assert_eq!(
            run1("IsNaN", &[], &[&x]).as_slice::<bool>().unwrap(),
            &[true, false, false, false]
        );
        assert_eq!(
            run1("IsInf", &[], &[&x]).as_slice::<bool>().unwrap(),
            &[false, true, true, false]
        );
        let only_neg = [("detect_positive", Attr::Int(0))];
        assert_eq!(
            run1("IsInf", &only_neg, &[&x]).as_slice::<bool>().unwrap(),
            &[false, false, true, false]
        );
    }
}
