//! Fused CPU ops for the training path, each with a hand-written backward
//! pass.
//!
//! Candle's autograd differentiates every op it recorded and allocates a
//! fresh tensor for each intermediate and each gradient. Composed from small
//! ops, one softmax is five tensors kept for the backward pass and about as
//! many again inside it; a matmul with a frozen weight also gets that
//! weight's full-size gradient, computed and then never read. On a CPU
//! training step that is most of the memory traffic and a third of the
//! matmul work. These ops do each job in one pass:
//!
//! - [`linear`]: `x W^T`; when `W` needs no gradient (a frozen base weight
//!   under LoRA) the backward pass computes `dx` alone;
//! - [`lora_linear`]: `x W^T + s (x A^T) B^T`, a frozen projection and its
//!   adapter as one op, with `dx`, `dA` and `dB` from one backward pass;
//! - [`softmax_last_dim`] and [`attention_probs`] (scale, mask and softmax
//!   in one pass): the backward `y * (g - sum(g * y))` in one pass too;
//! - [`rms_norm`]: `x / rms(x) * w`, with `dx` and (only when `w` trains) `dw`;
//! - [`rope_heads`]: the split into heads and the `rotate_half` rotation
//!   in one pass; its backward is the rotation's transpose;
//! - [`swiglu`]: `silu(gate) * up`, the MLP's gate;
//! - [`weighted_nll`]: summed, weighted negative log-likelihood straight
//!   from logits, without the `[rows, vocab]` log-softmax tensors;
//! - [`head_nll`]: the vocabulary projection and that loss together, a block
//!   of rows at a time, skipping unscored rows, with `dx` computed on the
//!   way so no `[rows, vocab]` tensor outlives its block.
//!
//! Attention itself is one op too, in [`super::attention`].
//!
//! Each falls back to the composed candle ops off the CPU or for dtypes
//! other than f32. Both paths compute the same function for the inputs the
//! model gives them (a mask is a constant and gets no gradient; a row of
//! weight 0 contributes nothing to a loss, even with non-finite logits on
//! the fused path), so results differ only by rounding. Work is split by rows, and every reduction across rows runs in
//! a fixed order, so the bytes do not depend on the number of threads.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::attention::{View, matmul};

/// Rows per parallel work item: enough to amortise scheduling, few enough
/// to balance two to sixteen threads.
const ROW_BLOCK: usize = 16;

/// Elements per parallel work item of the elementwise ops.
const ELEMENT_BLOCK: usize = 1 << 14;

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The contiguous f32 data behind a storage and layout.
pub(super) fn f32_data<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: expected f32, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn u32_data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else {
        candle_core::bail!("{what}: expected u32, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("expected a non-empty last dimension, got {:?}", layout.dims()),
    }
}

// ---------------------------------------------------------------- linear

/// `x @ w^T` for `x` `[.., in]` and `w` `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
    if x.track_op() && !w.track_op() && fast_path(x) && w.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() });
    }
    let (rows, inner) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
    x.reshape((rows, inner))?.matmul(&w.t()?)?.reshape(shape)
}

/// `x` `[.., in]` as the matrix `[rows, in]` it is in memory.
fn as_rows(layout: &Layout) -> Result<(Layout, usize, usize)> {
    let inner = last_dim(layout)?;
    let rows = layout.shape().elem_count() / inner;
    if !layout.is_contiguous() {
        candle_core::bail!("expected a contiguous input, got strides {:?}", layout.stride());
    }
    Ok((Layout::contiguous_with_offset((rows, inner), layout.start_offset()), rows, inner))
}

/// `rows x inner` times the transpose of the `[n, inner]` matrix `m`.
fn times_transpose(x: &CpuStorage, x_rows: &Layout, m: &Tensor) -> Result<CpuStorage> {
    let (rows, inner) = x_rows.shape().dims2()?;
    let (storage, layout) = m.storage_and_layout();
    let Storage::Cpu(data) = &*storage else { candle_core::bail!("expected a CPU tensor") };
    let n = layout.dims()[0];
    x.matmul(data, (1, rows, n, inner), x_rows, &layout.transpose(0, 1)?)
}

/// `x W^T` with `W` held as a constant: the backward pass returns `dx = g W`
/// and nothing for `W`. Takes and returns any rank (`[.., in]` to `[.., out]`),
/// so no reshape enters the graph.
struct FrozenLinear {
    /// `[out, in]`.
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows_layout, _, _) = as_rows(layout)?;
        let y = times_transpose(x, &rows_layout, &self.w)?;
        let mut shape = layout.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = self.w.dim(0)?;
        Ok((y, Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = self.w.dim(0)?;
        let g = grad.reshape(((), out))?;
        g.matmul(&self.w)?.reshape(x.dims()).map(Some)
    }
}

// ----------------------------------------------------------------- LoRA

/// `x W^T + scale (x A^T) B^T` for `x` `[.., in]`, a frozen `W` `[out, in]`,
/// `A` `[r, in]` and `B` `[out, r]`, never forming `B A`. On the fast path
/// the projection and its adapter are one op in the graph, and the backward
/// pass returns `dx`, `dA` and `dB` directly.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let f32s = [w, a, b].iter().all(|t| t.dtype() == DType::F32);
    if fast_path(x) && f32s && !w.track_op() {
        let op = LoraLinear { w: w.clone(), scale: scale as f32 };
        return x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op);
    }
    let y = linear(x, w)?;
    y + (linear(&linear(x, a)?, b)? * scale)?
}

struct LoraLinear {
    /// `[out, in]`, frozen.
    w: Tensor,
    scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows_layout, rows, inner) = as_rows(x_layout)?;
        let (rank, a_inner) = a_layout.shape().dims2()?;
        let (out, b_rank) = b_layout.shape().dims2()?;
        if a_inner != inner || b_rank != rank || self.w.dims() != [out, inner] {
            candle_core::bail!(
                "lora-linear: x [.., {inner}], W {:?}, A [{rank}, {a_inner}], B [{out}, {b_rank}]",
                self.w.dims()
            );
        }
        let y = times_transpose(x, &rows_layout, &self.w)?;
        let t = x.matmul(a, (1, rows, rank, inner), &rows_layout, &a_layout.transpose(0, 1)?)?;
        let t_layout = Layout::contiguous((rows, rank));
        let d = t.matmul(b, (1, rows, out, rank), &t_layout, &b_layout.transpose(0, 1)?)?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(d)) = (y, d) else {
            candle_core::bail!("lora-linear: expected f32")
        };
        let scale = self.scale;
        y.par_chunks_mut(ELEMENT_BLOCK).zip(d.par_chunks(ELEMENT_BLOCK)).for_each(|(y, d)| {
            y.iter_mut().zip(d).for_each(|(y, d)| *y += scale * d);
        });
        let mut shape = x_layout.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = out;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    /// cuBLAS for `x W^T`, then the fused kernel of `kernels/lora.cu` adds the adapter in place.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        a: &candle_core::CudaStorage,
        a_layout: &Layout,
        b: &candle_core::CudaStorage,
        b_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let inputs = super::cuda_lora::Inputs { x, x_layout, a, a_layout, b, b_layout };
        super::cuda_lora::lora_linear_fwd(&self.w, self.scale, &inputs)
    }

    /// With `g` `[rows, out]` and `gB = g B`: `dx = g W + s gB A`,
    /// `dA = s gB^T x`, `dB = s g^T (x A^T)`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = f64::from(self.scale);
        let inner = x.dim(D::Minus1)?;
        let out = self.w.dim(0)?;
        let x2 = x.detach().reshape(((), inner))?;
        let g = grad.reshape(((), out))?;
        let (a_val, b_val) = (a.detach(), b.detach());
        let gb = g.matmul(&b_val)?;
        let dx = if x.track_op() {
            let dx = (g.matmul(&self.w)? + (gb.matmul(&a_val)? * scale)?)?;
            Some(dx.reshape(x.dims())?)
        } else {
            None
        };
        let da = if a.track_op() { Some((gb.t()?.matmul(&x2)? * scale)?) } else { None };
        let db = if b.track_op() {
            let t = x2.matmul(&a_val.t()?)?;
            Some((g.t()?.matmul(&t)? * scale)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

// --------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    if fast_path(x) {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        let op = ScaledSoftmax { scale: 1.0, bias: None, rows_per_bias: rows };
        return x.contiguous()?.apply_op1(op);
    }
    composed_softmax(x)
}

/// Softmax from differentiable ops. The max only keeps exp() in range and
/// cancels out of the gradient, so it is detached.
fn composed_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Attention probabilities `softmax(scores * scale + bias)` for `scores`
/// `[b, heads, seq, keys]` and an additive mask `bias` `[b or 1, 1, seq,
/// keys]` (a constant: it gets no gradient).
pub fn attention_probs(scores: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    let (batch, heads, seq, keys) = scores.dims4()?;
    if fast_path(scores) && bias.is_none_or(|b| b.dtype() == DType::F32) {
        let rows_per_bias = match bias.map(Tensor::dims) {
            None => batch * heads * seq,
            Some([1, 1, s, k]) if (*s, *k) == (seq, keys) => batch * heads * seq,
            Some([b, 1, s, k]) if (*b, *s, *k) == (batch, seq, keys) => heads * seq,
            Some(other) => {
                candle_core::bail!("attention bias {other:?} for scores {:?}", scores.dims())
            }
        };
        let bias = bias.map(|b| b.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let op = ScaledSoftmax { scale: scale as f32, bias, rows_per_bias };
        return scores.contiguous()?.apply_op1(op);
    }
    let scaled = (scores * scale)?;
    let scaled = match bias {
        Some(bias) => scaled.broadcast_add(bias)?,
        None => scaled,
    };
    if scaled.track_op() {
        composed_softmax(&scaled)
    } else {
        candle_nn::ops::softmax_last_dim(&scaled)
    }
}

/// `softmax(x * scale + bias)` row by row. `bias`, when given, holds `[seq,
/// keys]` blocks; a run of `rows_per_bias` consecutive rows shares one
/// block (its row `r % seq`).
struct ScaledSoftmax {
    scale: f32,
    bias: Option<Vec<f32>>,
    rows_per_bias: usize,
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(layout)?;
        let x = f32_data(x, layout, "softmax")?;
        let dims = layout.dims();
        let seq = if dims.len() >= 2 { dims[dims.len() - 2] } else { 1 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n * ROW_BLOCK).zip(x.par_chunks(n * ROW_BLOCK)).enumerate().for_each(
            |(block, (y, x))| {
                for (i, (y, x)) in y.chunks_mut(n).zip(x.chunks(n)).enumerate() {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = x * self.scale;
                    }
                    if let Some(bias) = &self.bias {
                        let row = block * ROW_BLOCK + i;
                        let at = ((row / self.rows_per_bias) * seq + row % seq) * n;
                        y.iter_mut().zip(&bias[at..at + n]).for_each(|(y, b)| *y += b);
                    }
                    softmax_in_place(y);
                }
            },
        );
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale: self.scale }).map(Some)
    }
}

pub(super) fn softmax_in_place(y: &mut [f32]) {
    let max = y.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv = 1.0 / exp_shifted(y, max);
    y.iter_mut().for_each(|y| *y *= inv);
}

/// `x <- exp(x - shift)` over a slice, returning the new values' sum: the
/// inner loop of every softmax here. Written so the compiler vectorises it
/// (AVX2 where the CPU has it, chosen at run time), with no fused
/// multiply-adds, so every x86-64 CPU computes the same bits.
pub(super) fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only feature the function enables.
        return unsafe { exp_shifted_avx2(xs, shift) };
    }
    exp_shifted_body(xs, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_shifted_avx2(xs: &mut [f32], shift: f32) -> f32 {
    exp_shifted_body(xs, shift)
}

#[inline(always)]
fn exp_shifted_body(xs: &mut [f32], shift: f32) -> f32 {
    for x in xs.iter_mut() {
        *x = exp(*x - shift);
    }
    // Eight running sums, added in a fixed order: vectorisable, and the
    // same result on any machine.
    let mut lanes = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// `e^x` within a few ulp of `f32::exp` for `x` in [-87, 88]; from about
/// -87.7 down it is 0 (masked attention scores land there), above 88 it
/// saturates.
/// `e^x = 2^n e^r` with `n = round(x / ln 2)` and `|r| <= ln(2) / 2`, `e^r`
/// by its degree-7 Taylor polynomial (truncation error below 6e-9).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer and leaves that integer
    // in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-88.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n as a float; n = -127 (x below about -87.7) gives 0.
    let scale = f32::from_bits(((n_int + 127).max(0) as u32) << 23);
    p * scale
}

fn softmax_row(x: &[f32], y: &mut [f32]) {
    y.copy_from_slice(x);
    softmax_in_place(y);
}

/// `dx = scale * y * (g - sum(g * y))`, row by row.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        y_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(y_layout)?;
        let y = f32_data(y, y_layout, "softmax-grad")?;
        let g = f32_data(g, g_layout, "softmax-grad")?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n * ROW_BLOCK)
            .zip(y.par_chunks(n * ROW_BLOCK).zip(g.par_chunks(n * ROW_BLOCK)))
            .for_each(|(dx, (y, g))| {
                for (dx, (y, g)) in dx.chunks_mut(n).zip(y.chunks(n).zip(g.chunks(n))) {
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = self.scale * y * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), y_layout.shape().clone()))
    }
}

// -------------------------------------------------------------- RMSNorm

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension. Half-precision
/// inputs are normalised in f32, as Hugging Face does.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.track_op() && !w.track_op() && x.dtype() != DType::F64 {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    if fast_path(x) && w.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    let work = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let rms = (work.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let normed = work.broadcast_div(&rms)?.to_dtype(dtype)?;
    normed.broadcast_mul(w)
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (mean + eps).sqrt()
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(x_layout)?;
        let x = f32_data(x, x_layout, "rms-norm")?;
        let w = f32_data(w, w_layout, "rms-norm weight")?;
        if w.len() != n {
            candle_core::bail!("rms-norm: weight of {} for rows of {n}", w.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n * ROW_BLOCK).zip(x.par_chunks(n * ROW_BLOCK)).for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(n).zip(x.chunks(n)) {
                let r = inv_rms(x, self.eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            }
        });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGrad { eps: self.eps, of: Of::Input })?;
        let dw = if w.track_op() {
            Some(x.apply_op3_no_bwd(w, &grad, &RmsNormGrad { eps: self.eps, of: Of::Weight })?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

#[derive(Clone, Copy)]
enum Of {
    Input,
    Weight,
}

/// With `r = 1 / rms(x)` and `d = g * w`:
/// `dx = r d - r^3 x mean(d x)`, `dw = sum over rows of g x r`.
struct RmsNormGrad {
    eps: f32,
    of: Of,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(x_layout)?;
        let x = f32_data(x, x_layout, "rms-norm-grad")?;
        let w = f32_data(w, w_layout, "rms-norm-grad weight")?;
        let g = f32_data(g, g_layout, "rms-norm-grad")?;
        match self.of {
            Of::Input => {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(n * ROW_BLOCK)
                    .zip(x.par_chunks(n * ROW_BLOCK).zip(g.par_chunks(n * ROW_BLOCK)))
                    .for_each(|(dx, (x, g))| {
                        for (dx, (x, g)) in dx.chunks_mut(n).zip(x.chunks(n).zip(g.chunks(n))) {
                            let r = inv_rms(x, self.eps);
                            let dot: f32 =
                                x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x).sum();
                            let k = r * r * r * dot / n as f32;
                            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                                *dx = r * g * w - k * x;
                            }
                        }
                    });
                Ok((CpuStorage::F32(dx), x_layout.shape().clone()))
            }
            Of::Weight => {
                // Partial sums per block of rows, added in block order.
                let partials: Vec<Vec<f32>> = x
                    .par_chunks(n * ROW_BLOCK)
                    .zip(g.par_chunks(n * ROW_BLOCK))
                    .map(|(x, g)| {
                        let mut acc = vec![0f32; n];
                        for (x, g) in x.chunks(n).zip(g.chunks(n)) {
                            let r = inv_rms(x, self.eps);
                            for ((acc, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                                *acc += g * x * r;
                            }
                        }
                        acc
                    })
                    .collect();
                let mut dw = vec![0f32; n];
                for part in &partials {
                    dw.iter_mut().zip(part).for_each(|(d, p)| *d += p);
                }
                Ok((CpuStorage::F32(dw), Shape::from(n)))
            }
        }
    }
}

// ------------------------------------------------------------------ RoPE

/// Splits `x` `[b, seq, heads * head_dim]` into heads and rotates each by
/// RoPE (`x * cos + rotate_half(x) * sin`): `[b, heads, seq, head_dim]`,
/// contiguous. The tables are `[seq, head_dim]` (every row at the same
/// positions) or `[b, 1, seq, head_dim]` (per-row positions). On the fast
/// path the head split and the rotation are one pass.
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (batch, seq, width) = x.dims3()?;
    if heads == 0 || width % heads != 0 || !(width / heads).is_multiple_of(2) {
        candle_core::bail!("rope: width {width} does not split into {heads} even-sized heads");
    }
    let dim = width / heads;
    if fast_path(x) && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 {
        let per_row = match (cos.dims(), sin.dims()) {
            ([s, d], [s2, d2]) if (*s, *d, *s2, *d2) == (seq, dim, seq, dim) => false,
            ([b, 1, s, d], [b2, 1, s2, d2])
                if (*b, *s, *d) == (batch, seq, dim) && (*b2, *s2, *d2) == (batch, seq, dim) =>
            {
                true
            }
            (c, s) => candle_core::bail!("rope: tables {c:?} and {s:?} for input {:?}", x.dims()),
        };
        let op = Rope {
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            shape: (batch, seq, heads, dim),
            per_row,
            inverse: false,
        };
        return x.contiguous()?.apply_op1(op);
    }
    let x = x.reshape((batch, seq, heads, dim))?.transpose(1, 2)?.contiguous()?;
    let half = dim / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// The head split and rotation, or (`inverse`) its transpose, which is its
/// gradient: `[b, seq, heads, dim]` in, `[b, heads, seq, dim]` out, and the
/// other way round for the inverse. Per head and position the rotation is
/// `y[i] = x[i] c[i] - x[i+h] s[i]` on the first half and
/// `y[i] = x[i] c[i] + x[i-h] s[i]` on the second; its transpose moves each
/// `s` term to the other half with the opposite sign.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `(batch, seq, heads, dim)`.
    shape: (usize, usize, usize, usize),
    per_row: bool,
    inverse: bool,
}

impl Rope {
    fn rotate(&self, y: &mut [f32], x: &[f32], b: usize, t: usize) {
        let (_, seq, _, dim) = self.shape;
        let table = if self.per_row { (b * seq + t) * dim } else { t * dim };
        let c = &self.cos[table..table + dim];
        let s = &self.sin[table..table + dim];
        let half = dim / 2;
        for i in 0..half {
            let j = i + half;
            if self.inverse {
                y[i] = x[i] * c[i] + x[j] * s[j];
                y[j] = x[j] * c[j] - x[i] * s[i];
            } else {
                y[i] = x[i] * c[i] - x[j] * s[i];
                y[j] = x[j] * c[j] + x[i] * s[j];
            }
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, seq, heads, dim) = self.shape;
        let x = f32_data(x, layout, "rope")?;
        if x.len() != batch * seq * heads * dim {
            candle_core::bail!("rope: {} values for shape {:?}", x.len(), self.shape);
        }
        let mut y = vec![0f32; x.len()];
        if self.inverse {
            // Out `[b, seq, heads, dim]`: one work item per (b, t).
            y.par_chunks_mut(heads * dim).enumerate().for_each(|(item, y)| {
                let (b, t) = (item / seq, item % seq);
                for (h, y) in y.chunks_mut(dim).enumerate() {
                    let at = ((b * heads + h) * seq + t) * dim;
                    self.rotate(y, &x[at..at + dim], b, t);
                }
            });
            Ok((CpuStorage::F32(y), Shape::from((batch, seq, heads * dim))))
        } else {
            // Out `[b, heads, seq, dim]`: one work item per (b, h).
            y.par_chunks_mut(seq * dim).enumerate().for_each(|(item, y)| {
                let (b, h) = (item / heads, item % heads);
                for (t, y) in y.chunks_mut(dim).enumerate() {
                    let at = ((b * seq + t) * heads + h) * dim;
                    self.rotate(y, &x[at..at + dim], b, t);
                }
            });
            Ok((CpuStorage::F32(y), Shape::from((batch, heads, seq, dim))))
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            shape: self.shape,
            per_row: self.per_row,
            inverse: !self.inverse,
        };
        grad.contiguous()?.apply_op1_no_bwd(&op).map(Some)
    }
}

// -------------------------------------------------------------- SwiGLU

/// `silu(gate) * up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fast_path(gate) && up.dtype() == DType::F32 && gate.dims() == up.dims() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = f32_data(gate, gate_layout, "swiglu")?;
        let up = f32_data(up, up_layout, "swiglu")?;
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(ELEMENT_BLOCK)
            .zip(gate.par_chunks(ELEMENT_BLOCK).zip(up.par_chunks(ELEMENT_BLOCK)))
            .for_each(|(y, (gate, up))| {
                for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    *y = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let part = |of| gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad { of });
        let dgate = if gate.track_op() { Some(part(Of::Input)?) } else { None };
        let dup = if up.track_op() { Some(part(Of::Weight)?) } else { None };
        Ok((dgate, dup))
    }
}

/// `Of::Input`: `d gate = g u s (1 + x (1 - s))` with `s = sigmoid(gate)`;
/// `Of::Weight`: `d up = g silu(gate)`.
struct SwiGluGrad {
    of: Of,
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = f32_data(gate, gate_layout, "swiglu-grad")?;
        let up = f32_data(up, up_layout, "swiglu-grad")?;
        let g = f32_data(g, g_layout, "swiglu-grad")?;
        let mut d = vec![0f32; gate.len()];
        let of = self.of;
        d.par_chunks_mut(ELEMENT_BLOCK)
            .zip(gate.par_chunks(ELEMENT_BLOCK))
            .zip(up.par_chunks(ELEMENT_BLOCK).zip(g.par_chunks(ELEMENT_BLOCK)))
            .for_each(|((d, gate), (up, g))| {
                for (((d, &x), &u), &g) in d.iter_mut().zip(gate).zip(up).zip(g) {
                    let s = sigmoid(x);
                    *d = match of {
                        Of::Input => g * u * s * (1.0 + x * (1.0 - s)),
                        Of::Weight => g * x * s,
                    };
                }
            });
        Ok((CpuStorage::F32(d), gate_layout.shape().clone()))
    }
}

// ------------------------------------------------------- cross-entropy

/// `sum_r weights[r] * -log softmax(logits[r])[labels[r]]` as a scalar, for
/// `logits` `[rows, vocab]`, `labels` u32 `[rows]` and `weights` f32
/// `[rows]`. Rows of weight 0 cost nothing and get a zero gradient. The
/// log-softmax is computed in f32.
pub fn weighted_nll(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<Tensor> {
    check_labels(labels, logits.dim(D::Minus1)?)?;
    if fast_path(logits) {
        return logits.contiguous()?.apply_op3(
            &labels.contiguous()?,
            &weights.to_dtype(DType::F32)?.contiguous()?,
            WeightedNll,
        );
    }
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked * weights.to_dtype(DType::F32)?)?.sum_all()?.neg()
}

/// Every label (u32) must name a token of the vocabulary: the losses index
/// rows of logits with them.
fn check_labels(labels: &Tensor, vocab: usize) -> Result<()> {
    if let Some(&bad) = labels.to_vec1::<u32>()?.iter().find(|&&l| l as usize >= vocab) {
        candle_core::bail!("label {bad} is outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// `log sum exp` of a row, and the row's max.
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + x.iter().map(|&v| (v - max).exp()).sum::<f32>().ln()
}

struct WeightedNll;

impl CustomOp3 for WeightedNll {
    fn name(&self) -> &'static str {
        "weighted-nll"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        labels: &CpuStorage,
        labels_layout: &Layout,
        weights: &CpuStorage,
        weights_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let vocab = last_dim(logits_layout)?;
        let logits = f32_data(logits, logits_layout, "weighted-nll")?;
        let labels = u32_data(labels, labels_layout, "weighted-nll labels")?;
        let weights = f32_data(weights, weights_layout, "weighted-nll weights")?;
        let per_row: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(labels.par_iter().zip(weights.par_iter()))
            .map(|(row, (&label, &weight))| {
                if weight == 0.0 { 0.0 } else { weight * (log_sum_exp(row) - row[label as usize]) }
            })
            .collect();
        // Summed in row order, so the result does not depend on threads.
        let total: f32 = per_row.iter().sum();
        Ok((CpuStorage::F32(vec![total]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        weights: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let dlogits = logits.apply_op3_no_bwd(labels, weights, &WeightedNllGrad { scale })?;
        Ok((Some(dlogits), None, None))
    }
}

/// `dlogits[r] = scale * weights[r] * (softmax(logits[r]) - onehot(labels[r]))`.
struct WeightedNllGrad {
    scale: f32,
}

impl CustomOp3 for WeightedNllGrad {
    fn name(&self) -> &'static str {
        "weighted-nll-grad"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        labels: &CpuStorage,
        labels_layout: &Layout,
        weights: &CpuStorage,
        weights_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let vocab = last_dim(logits_layout)?;
        let logits = f32_data(logits, logits_layout, "weighted-nll-grad")?;
        let labels = u32_data(labels, labels_layout, "weighted-nll-grad labels")?;
        let weights = f32_data(weights, weights_layout, "weighted-nll-grad weights")?;
        let mut grad = vec![0f32; logits.len()];
        grad.par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .zip(labels.par_iter().zip(weights.par_iter()))
            .for_each(|((grad, row), (&label, &weight))| {
                if weight == 0.0 {
                    return;
                }
                softmax_row(row, grad);
                grad[label as usize] -= 1.0;
                let k = self.scale * weight;
                grad.iter_mut().for_each(|g| *g *= k);
            });
        Ok((CpuStorage::F32(grad), logits_layout.shape().clone()))
    }
}

/// Rows of the vocabulary projection per block of [`head_nll`]: a `[256,
/// vocab]` block of logits (48 MiB for a 49,152-token vocabulary) is the
/// most that exists at once.
const HEAD_ROWS: usize = 256;

/// `weighted_nll(x W^T, labels, weights)` for `x` `[rows, hidden]` and the
/// vocabulary projection `W` `[vocab, hidden]`. When `W` is frozen (LoRA
/// and prefix training) the fast path never holds more than a block of
/// logits: each block of scored rows is projected, turned into its loss
/// and, when `x` needs a gradient, straight into `dx = dlogits W`, which the
/// op keeps for its backward pass (the loss is a scalar, so the backward
/// only scales it). Unscored rows (weight 0) are never projected at all:
/// in instruction tuning that is every prompt position.
pub fn head_nll(x: &Tensor, w: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let vocab = w.dim(0)?;
    let frozen_f32 = w.dtype() == DType::F32 && !w.track_op() && w.is_contiguous();
    if fast_path(x) && frozen_f32 && w.dims() == [vocab, x.dim(D::Minus1)?] && x.rank() == 2 {
        // The fallback's `weighted_nll` checks the labels itself.
        check_labels(labels, vocab)?;
        let op = HeadNll { w: w.clone(), grad: x.track_op(), dx: std::sync::Mutex::new(None) };
        return x.contiguous()?.apply_op3(
            &labels.contiguous()?,
            &weights.to_dtype(DType::F32)?.contiguous()?,
            op,
        );
    }
    weighted_nll(&linear(x, w)?, labels, weights)
}

struct HeadNll {
    /// `[vocab, hidden]`, frozen.
    w: Tensor,
    /// Whether to compute `dx` during the forward pass.
    grad: bool,
    /// `d loss / dx`, `[rows, hidden]`, for the backward pass.
    dx: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for HeadNll {
    fn name(&self) -> &'static str {
        "head-nll"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        labels: &CpuStorage,
        labels_layout: &Layout,
        weights: &CpuStorage,
        weights_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, hidden) = x_layout.shape().dims2()?;
        let x = f32_data(x, x_layout, "head-nll")?;
        let labels = u32_data(labels, labels_layout, "head-nll labels")?;
        let weights = f32_data(weights, weights_layout, "head-nll weights")?;
        if labels.len() != rows || weights.len() != rows {
            candle_core::bail!(
                "head-nll: {rows} rows, {} labels, {} weights",
                labels.len(),
                weights.len()
            );
        }
        let (storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            candle_core::bail!("head-nll: W is not on the CPU")
        };
        let w = f32_data(w, w_layout, "head-nll weight")?;
        let vocab = w.len() / hidden;
        let scored: Vec<usize> = (0..rows).filter(|&r| weights[r] != 0.0).collect();
        let mut losses = Vec::with_capacity(scored.len());
        let mut dx = if self.grad { vec![0f32; rows * hidden] } else { Vec::new() };
        let (wv, wt) = (View::rows(w, vocab, hidden), View::rows(w, vocab, hidden).t());
        // A block at a time, each matmul across the thread pool (so `W` is
        // packed once per block, not once per thread), the rows' losses and
        // probabilities in parallel in between.
        for block in scored.chunks(HEAD_ROWS) {
            let n = block.len();
            let xs: Vec<f32> =
                block.iter().flat_map(|&r| &x[r * hidden..(r + 1) * hidden]).copied().collect();
            let mut logits = vec![0f32; n * vocab];
            matmul(&mut logits, vocab, View::rows(&xs, n, hidden), wt, false, true);
            let block_losses: Vec<f32> = logits
                .par_chunks_mut(vocab)
                .zip(block.par_iter())
                .map(|(row, &r)| {
                    let (label, weight) = (labels[r] as usize, weights[r]);
                    let picked = row[label];
                    // One exp per logit: the row becomes exp(l - max), its
                    // sum gives the log-normaliser, and (with a gradient
                    // wanted) one scaling turns it into the probabilities.
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = exp_shifted(row, max);
                    if self.grad {
                        let k = weight / sum;
                        row.iter_mut().for_each(|l| *l *= k);
                        row[label] -= weight;
                    }
                    weight * (max + sum.ln() - picked)
                })
                .collect();
            losses.extend(block_losses);
            if self.grad {
                let mut block_dx = vec![0f32; n * hidden];
                matmul(&mut block_dx, hidden, View::rows(&logits, n, vocab), wv, false, true);
                for (&r, d) in block.iter().zip(block_dx.chunks(hidden)) {
                    dx[r * hidden..(r + 1) * hidden].copy_from_slice(d);
                }
            }
        }
        // Summed in row order, so the result does not depend on threads.
        let total: f32 = losses.iter().sum();
        if self.grad {
            *self.dx.lock().expect("head-nll lock") = Some(dx);
        }
        Ok((CpuStorage::F32(vec![total]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _labels: &Tensor,
        _weights: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !self.grad {
            // Only the labels or weights track: neither gets a gradient.
            return Ok((None, None, None));
        }
        let guard = self.dx.lock().expect("head-nll lock");
        let Some(dx) = guard.as_ref() else {
            candle_core::bail!("head-nll: backward through a forward pass that kept no gradient")
        };
        let scale = f64::from(grad.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        let dx = (Tensor::from_slice(dx, x.dims(), x.device())? * scale)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// A tensor of uniform values in [-2, 2) from `seed`.
    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Runs `f` on variables made from `inputs` along both paths (fused on
    /// f32, composed on f64, which has no fast path) and compares the
    /// values and the gradients of `sum(f(..) * probe)`.
    fn check(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
        let run = |dtype: DType| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                .collect();
            let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let out = f(&tensors);
            let probe = random(out.dims(), 99).to_dtype(out.dtype()).unwrap();
            let grads = (&out * probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap())
                .collect();
            (out.to_dtype(DType::F32).unwrap(), grads)
        };
        let (fused, fused_grads) = run(DType::F32);
        let (composed, composed_grads) = run(DType::F64);
        assert!(
            max_diff(&fused, &composed) < tol,
            "values differ by {}",
            max_diff(&fused, &composed)
        );
        for (i, (a, b)) in fused_grads.iter().zip(&composed_grads).enumerate() {
            assert!(max_diff(a, b) < tol, "gradient {i} differs by {}", max_diff(a, b));
        }
    }

    #[test]
    fn softmax_matches_the_composed_ops() {
        check(&[random(&[3, 5, 17], 1)], |t| softmax_last_dim(&t[0]).unwrap(), 1e-5);
    }

    #[test]
    fn rms_norm_matches_the_composed_ops_for_input_and_weight() {
        check(
            &[random(&[2, 40, 24], 2), random(&[24], 3)],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            1e-4,
        );
    }

    #[test]
    fn rope_matches_the_composed_ops_with_shared_and_per_row_tables() {
        for (tables, seed) in [(vec![6, 8], 4), (vec![2, 1, 6, 8], 7)] {
            let cos = random(&tables, seed).cos().unwrap();
            let sin = random(&tables, seed + 1).sin().unwrap();
            check(
                &[random(&[2, 6, 3 * 8], seed + 2)],
                |t| {
                    let dtype = t[0].dtype();
                    let (c, s) = (cos.to_dtype(dtype).unwrap(), sin.to_dtype(dtype).unwrap());
                    rope_heads(&t[0], 3, &c, &s).unwrap()
                },
                1e-5,
            );
        }
    }

    #[test]
    fn attention_probs_match_the_composed_ops_with_each_kind_of_mask() {
        let shared = random(&[1, 1, 5, 7], 17);
        let per_row = random(&[2, 1, 5, 7], 18);
        for bias in [None, Some(&shared), Some(&per_row)] {
            check(
                &[random(&[2, 3, 5, 7], 19)],
                |t| {
                    let dtype = t[0].dtype();
                    let bias = bias.map(|b| b.to_dtype(dtype).unwrap());
                    attention_probs(&t[0], 0.125, bias.as_ref()).unwrap()
                },
                1e-5,
            );
        }
    }

    #[test]
    fn swiglu_matches_the_composed_ops() {
        check(
            &[random(&[3, 7, 11], 15), random(&[3, 7, 11], 16)],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn weighted_nll_matches_the_composed_ops_and_skips_unweighted_rows() {
        let labels = Tensor::new(&[3u32, 0, 9, 4], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[1f32, 0.0, 0.5, 1.0], &Device::Cpu).unwrap();
        check(&[random(&[4, 10], 10)], |t| weighted_nll(&t[0], &labels, &weights).unwrap(), 1e-4);
        let bad = Tensor::new(&[3u32, 0, 10, 4], &Device::Cpu).unwrap();
        let err = weighted_nll(&random(&[4, 10], 10), &bad, &weights).unwrap_err();
        assert!(err.to_string().contains("label 10"), "{err}");
    }

    #[test]
    fn head_nll_matches_the_projection_then_weighted_nll() {
        // 70 rows: more than one block, with unscored rows among them.
        let (rows, hidden, vocab) = (70, 6, 11);
        let w = random(&[vocab, hidden], 50);
        let labels: Vec<u32> = (0..rows).map(|r| (r * 7 % vocab) as u32).collect();
        let weights: Vec<f32> =
            (0..rows).map(|r| if r % 5 == 0 { 0.0 } else { 1.0 + (r % 3) as f32 }).collect();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let weights = Tensor::new(weights.as_slice(), &Device::Cpu).unwrap();
        check(
            &[random(&[rows, hidden], 51)],
            |t| {
                let w = w.to_dtype(t[0].dtype()).unwrap();
                let weights = weights.to_dtype(t[0].dtype()).unwrap();
                let loss = head_nll(&t[0], &w, &labels, &weights).unwrap();
                // A non-trivial upstream gradient for the backward pass.
                (loss * 0.75).unwrap()
            },
            1e-3,
        );
    }

    #[test]
    fn the_vectorised_exp_is_within_four_ulp_of_the_exact_one() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * f64::from(i) / 200_000.0;
            let got = f64::from(exp(x as f32));
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4.0 * f64::from(f32::EPSILON), "relative error {worst:e}");
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(0.0), 1.0);
        let mut row = vec![0.5f32, -3.0, 2.0, -1e9, 1.0, 0.0, 7.5, -2.5, 3.25, 0.125];
        let want: f32 = row.iter().map(|x| (x - 7.5f32).exp()).sum();
        let sum = exp_shifted(&mut row, 7.5);
        assert!((sum - want).abs() < 1e-6 * want, "{sum} vs {want}");
        assert_eq!(row[3], 0.0);
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_the_input_the_right_one() {
        let x = Var::from_tensor(&random(&[2, 3, 5], 11)).unwrap();
        let w = random(&[4, 5], 12);
        let y = linear(x.as_tensor(), &w).unwrap();
        let expected = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&y, &expected) < 1e-6);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
        let dx = grads.get(x.as_tensor()).unwrap();
        let expected = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)
            .unwrap()
            .broadcast_matmul(&w)
            .unwrap();
        assert!(max_diff(dx, &expected) < 1e-6);
    }

    #[test]
    fn lora_linear_matches_the_composed_ops() {
        let w = random(&[6, 5], 20);
        check(
            &[random(&[2, 3, 5], 21), random(&[4, 5], 22), random(&[6, 4], 23)],
            |t| {
                let w = w.to_dtype(t[0].dtype()).unwrap();
                lora_linear(&t[0], &w, &t[1], &t[2], 0.5).unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn fused_results_do_not_depend_on_the_thread_count() {
        let x = random(&[64, 33], 13);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let many = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let w = random(&[33], 14);
        let run = || {
            let v = Var::from_tensor(&x).unwrap();
            let wv = Var::from_tensor(&w).unwrap();
            let y = rms_norm(v.as_tensor(), wv.as_tensor(), 1e-6).unwrap();
            let g = softmax_last_dim(&y).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = g.backward().unwrap();
            (
                grads.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
                grads.get(wv.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            )
        };
        assert_eq!(one.install(run), many.install(run));
    }
}
