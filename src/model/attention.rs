//! Grouped-query attention as one CPU op, forward and backward.
//!
//! Composed from candle ops, one layer's attention is a batched matmul for
//! the scores, a softmax, a batched matmul for the values and a transpose
//! copy back to `[batch, seq, heads * head_dim]`; the backward pass runs
//! four more batched matmuls, the softmax gradient and the copies, and
//! candle sums each gradient into a fresh zeroed tensor. Every batched
//! matmul splits its small per-head products across the thread pool anew.
//!
//! [`attention`] does it in one pass instead: one work item per batch row
//! and key/value head, holding the query heads that share it, each item
//! running its products on one thread (`gemm` without parallelism) and
//! writing its own disjoint share of the output. The probabilities are kept
//! inside the op for the backward pass, which computes `dq`, `dk` and `dv`
//! together, item by item, with the same split. Work and reductions happen
//! in a fixed order per item, so results do not depend on the thread count.
//!
//! Off the CPU, or for dtypes other than f32, [`attention`] runs the
//! composed ops, which compute the same function.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::ops::{attention_probs, f32_data};

/// `softmax(q k^T * scale + bias) v` for `q` `[b, heads, seq, d]`, `k` and
/// `v` `[b, kv_heads, keys, d]` (query head `h` reads key/value head
/// `h / (heads / kv_heads)`) and an additive mask `bias` `[b or 1, 1, seq,
/// keys]` (a constant). Returns `[b, seq, heads * d]`, the layout the output
/// projection reads.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, heads, seq, dim) = q.dims4()?;
    let (kb, kv_heads, keys, kd) = k.dims4()?;
    if kb != batch || kd != dim || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    }
    let fast = q.device().is_cpu()
        && [batch, seq, keys, dim].iter().all(|&n| n > 0)
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    if fast {
        let bias = match bias {
            None => None,
            Some(b) => {
                let per_row = match b.dims() {
                    [1, 1, s, t] if (*s, *t) == (seq, keys) => false,
                    [bb, 1, s, t] if (*bb, *s, *t) == (batch, seq, keys) => true,
                    other => candle_core::bail!("attention bias {other:?} for {seq} x {keys}"),
                };
                Some((b.flatten_all()?.to_vec1::<f32>()?, per_row))
            }
        };
        let op = Attention {
            shape: Dims { batch, heads, kv_heads, seq, keys, dim },
            scale: scale as f32,
            bias,
            probs: Mutex::new(None),
        };
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    composed(q, k, v, scale, bias)
}

/// The same function from candle ops: the query heads that share a
/// key/value head are stacked along the sequence axis, so K and V are never
/// copied per query head.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, heads, seq, dim) = q.dims4()?;
    let (_, kv_heads, keys, _) = k.dims4()?;
    let group = heads / kv_heads;
    let q = q.reshape((batch, kv_heads, group * seq, dim))?;
    let scores = q.matmul(&k.t()?)?.reshape((batch, heads, seq, keys))?;
    let probs = attention_probs(&scores, scale, bias)?;
    let probs = probs.reshape((batch, kv_heads, group * seq, keys))?;
    let out = probs.matmul(v)?.reshape((batch, heads, seq, dim))?;
    out.transpose(1, 2)?.reshape((batch, seq, heads * dim))
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    keys: usize,
    dim: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

struct Attention {
    shape: Dims,
    scale: f32,
    /// The mask's values and whether each batch row has its own.
    bias: Option<(Vec<f32>, bool)>,
    /// `[b, heads, seq, keys]`, kept by the forward pass for the backward.
    probs: Mutex<Option<Vec<f32>>>,
}

/// A strided read-only matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows x cols` block starting at `data[0]`.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Index one past the last element the view reads.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// `dst = a b` (or `dst += a b` with `accumulate`) for a row-major `dst`
/// with row stride `dst_stride`: on this thread, or (`parallel`) across the
/// thread pool.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    a: View,
    b: View,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(b.rows, k, "inner dimensions");
    assert!(a.extent() <= a.data.len() && b.extent() <= b.data.len(), "operand out of bounds");
    assert!(m == 0 || n == 0 || (m - 1) * dst_stride + n <= dst.len(), "output out of bounds");
    // Rows that overlapped would be written by several threads at once.
    assert!(m <= 1 || n <= dst_stride, "output rows overlap");
    // SAFETY: the asserts above keep every index gemm touches inside the
    // three slices, with rows apart; `dst` is borrowed mutably, so it
    // aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f32_data(cpu, layout, "attention")?.to_vec()),
        _ => candle_core::bail!("attention: expected a CPU tensor"),
    }
}

impl Attention {
    /// The mask row for batch row `b`, query `i`.
    fn bias_row(&self, b: usize, i: usize) -> Option<&[f32]> {
        let Dims { seq, keys, .. } = self.shape;
        self.bias.as_ref().map(|(bias, per_row)| {
            let at = ((if *per_row { b } else { 0 }) * seq + i) * keys;
            &bias[at..at + keys]
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { batch, heads, kv_heads, seq, keys, dim } = self.shape;
        let group = self.shape.group();
        let q = f32_data(q, q_layout, "attention q")?;
        let k = f32_data(k, k_layout, "attention k")?;
        let v = f32_data(v, v_layout, "attention v")?;
        let mut probs = vec![0f32; batch * heads * seq * keys];
        // One item per (batch row, key/value head): its query heads'
        // probabilities are one contiguous block, its outputs a local buffer.
        let outputs: Vec<Vec<f32>> = probs
            .par_chunks_mut(group * seq * keys)
            .enumerate()
            .map(|(item, probs)| {
                let (b, kv) = (item / kv_heads, item % kv_heads);
                let kv_at = (b * kv_heads + kv) * keys * dim;
                let k = View::rows(&k[kv_at..kv_at + keys * dim], keys, dim);
                let v = View::rows(&v[kv_at..kv_at + keys * dim], keys, dim);
                let mut out = vec![0f32; group * seq * dim];
                for g in 0..group {
                    let h = kv * group + g;
                    let q_at = (b * heads + h) * seq * dim;
                    let q = View::rows(&q[q_at..q_at + seq * dim], seq, dim);
                    let p = &mut probs[g * seq * keys..(g + 1) * seq * keys];
                    matmul(p, keys, q, k.t(), false, false);
                    for (i, row) in p.chunks_mut(keys).enumerate() {
                        row.iter_mut().for_each(|x| *x *= self.scale);
                        if let Some(bias) = self.bias_row(b, i) {
                            row.iter_mut().zip(bias).for_each(|(x, m)| *x += m);
                        }
                        super::ops::softmax_in_place(row);
                    }
                    let p = View::rows(p, seq, keys);
                    matmul(&mut out[g * seq * dim..(g + 1) * seq * dim], dim, p, v, false, false);
                }
                out
            })
            .collect();
        let width = heads * dim;
        let mut y = vec![0f32; batch * seq * width];
        for (item, out) in outputs.iter().enumerate() {
            let (b, kv) = (item / kv_heads, item % kv_heads);
            for g in 0..group {
                let h = kv * group + g;
                for i in 0..seq {
                    let to = (b * seq + i) * width + h * dim;
                    let from = (g * seq + i) * dim;
                    y[to..to + dim].copy_from_slice(&out[from..from + dim]);
                }
            }
        }
        *self.probs.lock().expect("probabilities lock") = Some(probs);
        Ok((CpuStorage::F32(y), Shape::from((batch, seq, width))))
    }

    /// Per query head, with `P` the probabilities and `G` the output's
    /// gradient: `dV += P^T G`, `dP = G V^T`, `dS = scale * P * (dP -
    /// rowsum(dP * P))`, `dQ = dS K`, `dK += dS^T Q`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { batch: _, heads, kv_heads, seq, keys, dim } = self.shape;
        let group = self.shape.group();
        let guard = self.probs.lock().expect("probabilities lock");
        let Some(probs) = guard.as_ref() else {
            candle_core::bail!("attention: backward before forward")
        };
        let (qd, kd, vd, gd) = (cpu_f32(q)?, cpu_f32(k)?, cpu_f32(v)?, cpu_f32(grad)?);
        let width = heads * dim;
        let mut dq = vec![0f32; qd.len()];
        let mut dk = vec![0f32; kd.len()];
        let mut dv = vec![0f32; vd.len()];
        dq.par_chunks_mut(group * seq * dim)
            .zip(dk.par_chunks_mut(keys * dim).zip(dv.par_chunks_mut(keys * dim)))
            .enumerate()
            .for_each(|(item, (dq, (dk, dv)))| {
                let (b, kv) = (item / kv_heads, item % kv_heads);
                let kv_at = (b * kv_heads + kv) * keys * dim;
                let k = View::rows(&kd[kv_at..kv_at + keys * dim], keys, dim);
                let v = View::rows(&vd[kv_at..kv_at + keys * dim], keys, dim);
                let mut ds = vec![0f32; seq * keys];
                for g in 0..group {
                    let h = kv * group + g;
                    let p_at = (b * heads + h) * seq * keys;
                    let p = View::rows(&probs[p_at..p_at + seq * keys], seq, keys);
                    let g_at = b * seq * width + h * dim;
                    let grad = View {
                        data: &gd[g_at..],
                        rows: seq,
                        cols: dim,
                        row_stride: width,
                        col_stride: 1,
                    };
                    matmul(dv, dim, p.t(), grad, g > 0, false);
                    matmul(&mut ds, keys, grad, v.t(), false, false);
                    for (row, p) in ds.chunks_mut(keys).zip(p.data.chunks(keys)) {
                        let dot: f32 = row.iter().zip(p).map(|(d, p)| d * p).sum();
                        row.iter_mut().zip(p).for_each(|(d, p)| *d = self.scale * p * (*d - dot));
                    }
                    let q_at = (b * heads + h) * seq * dim;
                    let q = View::rows(&qd[q_at..q_at + seq * dim], seq, dim);
                    let s = View::rows(&ds, seq, keys);
                    matmul(&mut dq[g * seq * dim..(g + 1) * seq * dim], dim, s, k, false, false);
                    matmul(dk, dim, s.t(), q, g > 0, false);
                }
            });
        let device = q.device();
        let wrap = |t: &Tensor, data: Vec<f32>| -> Result<Option<Tensor>> {
            if t.track_op() { Tensor::from_vec(data, t.dims(), device).map(Some) } else { Ok(None) }
        };
        Ok((wrap(q, dq)?, wrap(k, dk)?, wrap(v, dv)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::model::ops::tests::{max_diff, random};

    /// The fused op (f32) against the composed ops (f64, which has no fast
    /// path): values and the gradients of q, k and v, with no mask, a
    /// shared causal-style mask and a per-row mask, and more keys than
    /// queries (a prefix).
    #[test]
    fn fused_attention_matches_the_composed_ops() {
        let (b, heads, kv, seq, keys, d) = (2, 6, 2, 5, 7, 4);
        let shared = random(&[1, 1, seq, keys], 31);
        let per_row = random(&[b, 1, seq, keys], 32);
        for bias in [None, Some(&shared), Some(&per_row)] {
            let inputs = [
                random(&[b, heads, seq, d], 33),
                random(&[b, kv, keys, d], 34),
                random(&[b, kv, keys, d], 35),
            ];
            let run = |dtype: DType| {
                let vars: Vec<Var> = inputs
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                    .collect();
                let bias = bias.map(|m| m.to_dtype(dtype).unwrap());
                let out = attention(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                    0.5,
                    bias.as_ref(),
                )
                .unwrap();
                let probe = random(out.dims(), 36).to_dtype(dtype).unwrap();
                let grads = (&out * probe).unwrap().sum_all().unwrap().backward().unwrap();
                let grads: Vec<Tensor> = vars
                    .iter()
                    .map(|v| grads.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap())
                    .collect();
                (out.to_dtype(DType::F32).unwrap(), grads)
            };
            let (fused, fused_grads) = run(DType::F32);
            let (composed, composed_grads) = run(DType::F64);
            assert_eq!(fused.dims(), [b, seq, heads * d]);
            assert!(max_diff(&fused, &composed) < 1e-5, "values: {}", max_diff(&fused, &composed));
            for (i, (a, c)) in fused_grads.iter().zip(&composed_grads).enumerate() {
                assert!(max_diff(a, c) < 1e-4, "gradient {i} differs by {}", max_diff(a, c));
            }
        }
    }

    #[test]
    fn fused_attention_does_not_depend_on_the_thread_count() {
        let q = random(&[3, 4, 6, 8], 41);
        let k = random(&[3, 2, 6, 8], 42);
        let v = random(&[3, 2, 6, 8], 43);
        let run = || {
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let out =
                attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), 0.3, None)
                    .unwrap();
            let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let mut all = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for v in &vars {
                all.extend(
                    grads
                        .get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
            all
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let many = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        assert_eq!(one.install(run), many.install(run));
    }
}
