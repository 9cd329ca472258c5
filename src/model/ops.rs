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
//! - [`softmax_last_dim`]: its backward `y * (g - sum(g * y))` in one pass;
//! - [`rms_norm`]: `x / rms(x) * w`, with `dx` and (only when `w` trains) `dw`;
//! - [`rope`]: the `rotate_half` rotation; its backward is the inverse
//!   rotation;
//! - [`weighted_nll`]: summed, weighted negative log-likelihood straight
//!   from logits, without the `[rows, vocab]` log-softmax tensors.
//!
//! Each falls back to the composed candle ops off the CPU or for dtypes
//! other than f32, so results never depend on which path ran except through
//! rounding. Work is split by rows, and every reduction across rows runs in
//! a fixed order, so the bytes do not depend on the number of threads.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

/// Rows per parallel work item: enough to amortise scheduling, few enough
/// to balance two to sixteen threads.
const ROW_BLOCK: usize = 16;

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The contiguous f32 data behind a storage and layout.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
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
    let (rows, inner) = (dims[..dims.len() - 1].iter().product::<usize>(), dims[dims.len() - 1]);
    let x2 = x.reshape((rows, inner))?;
    let out = if x.track_op() && !w.track_op() && x.device().is_cpu() {
        x2.contiguous()?.apply_op1(FrozenLinear { wt: w.t()? })?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
    out.reshape(shape)
}

/// `x W^T` with `W` held as a constant: the backward pass returns `dx = g W`
/// and nothing for `W`.
struct FrozenLinear {
    /// `W^T`, `[in, out]` (a transposed view).
    wt: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inner) = layout.shape().dims2()?;
        let (storage, wt_layout) = self.wt.storage_and_layout();
        let Storage::Cpu(wt) = &*storage else {
            candle_core::bail!("frozen-linear: the weight is not on the CPU")
        };
        let out = wt_layout.dims()[1];
        let y = x.matmul(wt, (1, rows, out, inner), layout, wt_layout)?;
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        grad.matmul(&self.wt.t()?).map(Some)
    }
}

// --------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    if fast_path(x) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    // Composed: the max only keeps exp() in range and cancels out of the
    // gradient, so it is detached.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

fn softmax_row(x: &[f32], y: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (y, &x) in y.iter_mut().zip(x) {
        *y = (x - max).exp();
        sum += *y;
    }
    let inv = 1.0 / sum;
    y.iter_mut().for_each(|y| *y *= inv);
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(layout)?;
        let x = f32_data(x, layout, "softmax")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n * ROW_BLOCK).zip(x.par_chunks(n * ROW_BLOCK)).for_each(|(y, x)| {
            y.chunks_mut(n).zip(x.chunks(n)).for_each(|(y, x)| softmax_row(x, y))
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad).map(Some)
    }
}

/// `dx = y * (g - sum(g * y))`, row by row.
struct SoftmaxGrad;

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
                        *dx = y * (g - dot);
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

/// `x * cos + rotate_half(x) * sin` for `x` `[b, heads, seq, head_dim]`,
/// with tables `[seq, head_dim]` (every row at the same positions) or
/// `[b, 1, seq, head_dim]` (per-row positions).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fast_path(x) && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 {
        let (batch, _, seq, dim) = x.dims4()?;
        let per_row = match (cos.dims(), sin.dims()) {
            ([s, d], [s2, d2]) if (*s, *d, *s2, *d2) == (seq, dim, seq, dim) => false,
            ([b, 1, s, d], [b2, 1, s2, d2])
                if (*b, *s, *d) == (batch, seq, dim) && (*b2, *s2, *d2) == (batch, seq, dim) =>
            {
                true
            }
            (c, s) => candle_core::bail!("rope: tables {c:?} and {s:?} for input {:?}", x.dims()),
        };
        let op = Rope { cos: cos.contiguous()?, sin: sin.contiguous()?, per_row, inverse: false };
        return x.contiguous()?.apply_op1(op);
    }
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// The rotation, or (`inverse`) its transpose, which is its gradient:
/// forward `y[i] = x[i] c[i] - x[i+h] s[i]` for the first half and
/// `y[i] = x[i] c[i] + x[i-h] s[i]` for the second; the transpose moves
/// each `s` term to the other half with the opposite sign.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    per_row: bool,
    inverse: bool,
}

impl Rope {
    fn table(t: &Tensor) -> Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, heads, seq, dim) = layout.shape().dims4()?;
        let x = f32_data(x, layout, "rope")?;
        let (cos, sin) = (Self::table(&self.cos)?, Self::table(&self.sin)?);
        let half = dim / 2;
        let mut y = vec![0f32; x.len()];
        // One work item per (batch row, head): `seq` positions of `dim`.
        y.par_chunks_mut(seq * dim).zip(x.par_chunks(seq * dim)).enumerate().for_each(
            |(item, (y, x))| {
                let table = if self.per_row { (item / heads) * seq * dim } else { 0 };
                for (t, (y, x)) in y.chunks_mut(dim).zip(x.chunks(dim)).enumerate() {
                    let c = &cos[table + t * dim..table + (t + 1) * dim];
                    let s = &sin[table + t * dim..table + (t + 1) * dim];
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
            },
        );
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            per_row: self.per_row,
            inverse: !self.inverse,
        };
        grad.contiguous()?.apply_op1_no_bwd(&op).map(Some)
    }
}

// ------------------------------------------------------- cross-entropy

/// `sum_r weights[r] * -log softmax(logits[r])[labels[r]]` as a scalar, for
/// `logits` `[rows, vocab]`, `labels` u32 `[rows]` and `weights` f32
/// `[rows]`. Rows of weight 0 cost nothing and get a zero gradient. The
/// log-softmax is computed in f32.
pub fn weighted_nll(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    if let Some(&bad) = labels.to_vec1::<u32>()?.iter().find(|&&l| l as usize >= vocab) {
        candle_core::bail!("label {bad} is outside the vocabulary of {vocab}");
    }
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
        let (cos, sin) = (random(&[6, 8], 4).cos().unwrap(), random(&[6, 8], 5).sin().unwrap());
        check(
            &[random(&[2, 3, 6, 8], 6)],
            |t| {
                let dtype = t[0].dtype();
                rope(&t[0], &cos.to_dtype(dtype).unwrap(), &sin.to_dtype(dtype).unwrap()).unwrap()
            },
            1e-5,
        );
        let (cos, sin) =
            (random(&[2, 1, 6, 8], 7).cos().unwrap(), random(&[2, 1, 6, 8], 8).sin().unwrap());
        check(
            &[random(&[2, 3, 6, 8], 9)],
            |t| {
                let dtype = t[0].dtype();
                rope(&t[0], &cos.to_dtype(dtype).unwrap(), &sin.to_dtype(dtype).unwrap()).unwrap()
            },
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
