//! Per-head LoRA as one op on any device: `y = x W^T + s (x[:, cols] A^T) B^T`,
//! added into `y[:, rows]`.
//!
//! [`crate::adapt::lora`] adapts only the rows of `W` that belong to selected
//! heads (q/k/v) or only its columns (o). This op takes the adapter compact:
//! `A` `[r, n_cols]` and `B` `[n_rows, r]`, with a [`Selection`] saying which
//! input and output features they stand for, so neither the full-size `B A`
//! nor a full-size `[tokens, out]` delta is ever formed.
//!
//! On the CPU the op is [`reference_forward`] and [`reference_backward`]:
//! candle's `index_select`, `matmul` and `index_add` in f32, the definition
//! that the CUDA kernels are checked against. On a CUDA device (built with
//! the `cuda` feature) [`forward`] and [`backward`] run the fused kernels of
//! `kernels/lora.cu` through [`crate::model::cuda_lora`]; the base product
//! `x W^T` (and `g W`) stays a cuBLAS matmul. Both paths take f32 and bf16;
//! the kernels accumulate in f32.
//!
//! The kernel source is part of every build, so [`kernel_source_hash`] can go
//! into the cache key of a stage whichever features the binary has.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};

/// The CUDA source of the per-head LoRA kernels.
pub const KERNEL_SOURCE: &str = include_str!("../../kernels/lora.cu");

/// The largest adapter rank the kernels take (their accumulators are sized for it).
pub const MAX_RANK: usize = 64;

/// The launch geometry `kernels/lora.cu` is written for, as its `#define`s
/// give it (`tests/kernels.rs` checks the two agree): threads per block,
/// tokens per block of `low_rank_add`, tokens per partial sum of `outer_partial`.
pub const THREADS: u32 = 256;
pub const TILE_TOKENS: usize = 32;
pub const OUTER_TOKENS: usize = 256;

/// blake3 of [`KERNEL_SOURCE`], as hex: a stage that may run these kernels
/// puts it in its cache key, so editing them invalidates what they computed.
pub fn kernel_source_hash() -> String {
    blake3::hash(KERNEL_SOURCE.as_bytes()).to_hex().to_string()
}

/// Which features of a projection `W` (`[out, in]`) an adapter touches:
/// `rows` (output features, for q/k/v) and `cols` (input features, for o),
/// as u32 index tensors on the device of the op's inputs. `None` means all,
/// in order. Indices must be distinct.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub rows: Option<Tensor>,
    pub cols: Option<Tensor>,
}

impl Selection {
    /// Every feature on both sides: a plain (dense) LoRA.
    pub fn all() -> Self {
        Self::default()
    }

    /// The output features `rows` (an adapter on q, k or v).
    pub fn rows(rows: &[u32], device: &Device) -> Result<Self> {
        Ok(Self { rows: Some(Tensor::new(rows, device)?), cols: None })
    }

    /// The input features `cols` (an adapter on o).
    pub fn cols(cols: &[u32], device: &Device) -> Result<Self> {
        Ok(Self { rows: None, cols: Some(Tensor::new(cols, device)?) })
    }

    /// The features of the selected heads, `head_dim` consecutive ones per head.
    pub fn head_features(heads: &[bool], head_dim: usize) -> Vec<u32> {
        let selected = heads.iter().enumerate().filter(|(_, on)| **on);
        selected.flat_map(|(h, _)| (h * head_dim..(h + 1) * head_dim).map(|f| f as u32)).collect()
    }

    /// The number of output features the adapter writes, out of `out`.
    pub fn n_rows(&self, out: usize) -> Result<usize> {
        self.rows.as_ref().map_or(Ok(out), |r| r.dim(0))
    }

    /// The number of input features the adapter reads, out of `inner`.
    pub fn n_cols(&self, inner: usize) -> Result<usize> {
        self.cols.as_ref().map_or(Ok(inner), |c| c.dim(0))
    }

    fn to_device(&self, device: &Device) -> Result<Self> {
        let moved = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(Self { rows: moved(&self.rows)?, cols: moved(&self.cols)? })
    }
}

/// The shapes of one call, checked: `x` `[tokens, in]`, `W` `[out, in]`,
/// `A` `[r, n_cols]`, `B` `[n_rows, r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub tokens: usize,
    pub inner: usize,
    pub out: usize,
    pub rank: usize,
    pub n_rows: usize,
    pub n_cols: usize,
}

impl Dims {
    pub fn of(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, sel: &Selection) -> Result<Self> {
        let (tokens, inner) = x.dims2()?;
        let (out, w_inner) = w.dims2()?;
        let (rank, n_cols) = a.dims2()?;
        let (n_rows, b_rank) = b.dims2()?;
        let dims = Self { tokens, inner, out, rank, n_rows, n_cols };
        let fits = w_inner == inner
            && b_rank == rank
            && (1..=MAX_RANK).contains(&rank)
            && n_rows == sel.n_rows(out)?
            && n_cols == sel.n_cols(inner)?
            && n_rows <= out
            && n_cols <= inner;
        if !fits {
            candle_core::bail!(
                "lora-heads: x {:?}, W {:?}, A {:?}, B {:?}, {n_rows} selected rows, \
                 {n_cols} selected columns (rank at most {MAX_RANK})",
                x.dims(),
                w.dims(),
                a.dims(),
                b.dims()
            );
        }
        let index = [&sel.rows, &sel.cols].into_iter().flatten();
        let on_x = |t: &Tensor| t.device().same_device(x.device());
        if ![w, a, b].into_iter().chain(index.clone()).all(on_x)
            || index.clone().any(|i| i.dtype() != DType::U32)
        {
            candle_core::bail!(
                "lora-heads: W, A, B and the selection must be on x's device ({:?}), \
                 the selection as u32",
                x.device().location()
            );
        }
        Ok(dims)
    }
}

/// The gradients of one backward pass: `dx` `[tokens, in]`, `dA` `[r, n_cols]`,
/// `dB` `[n_rows, r]`.
#[derive(Debug)]
pub struct Grads {
    pub dx: Tensor,
    pub da: Tensor,
    pub db: Tensor,
}

/// `x W^T + s (x[:, cols] A^T) B^T` added into `[:, rows]`, for `x`
/// `[tokens, in]` (see [`Dims`]). One op in the autograd graph whose backward
/// pass is [`backward`]; `W` is treated as frozen.
pub fn forward(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    sel: &Selection,
    scale: f64,
) -> Result<Tensor> {
    Dims::of(x, w, a, b, sel)?;
    let op = HeadLora { w: w.contiguous()?, sel: sel.clone(), scale };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The gradients of [`forward`] for the output gradient `g` `[tokens, out]`:
/// `dx = g W + s (g[:, rows] B) A` (the second term into `[:, cols]`),
/// `dA = s (g[:, rows] B)^T x[:, cols]`, `dB = s g[:, rows]^T (x[:, cols] A^T)`.
pub fn backward(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    sel: &Selection,
    scale: f64,
    g: &Tensor,
) -> Result<Grads> {
    let dims = Dims::of(x, w, a, b, sel)?;
    if g.dims() != [dims.tokens, dims.out] || !g.device().same_device(x.device()) {
        candle_core::bail!(
            "lora-heads: the output gradient is {:?} on {:?}, expected [{}, {}] on x's device",
            g.dims(),
            g.device().location(),
            dims.tokens,
            dims.out
        );
    }
    if x.device().is_cuda() {
        return cuda_backward(x, w, a, b, sel, scale, g);
    }
    reference_backward(x, w, a, b, sel, scale, g)
}

#[cfg(feature = "cuda")]
fn cuda_backward(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    sel: &Selection,
    scale: f64,
    g: &Tensor,
) -> Result<Grads> {
    let c = |t: &Tensor| t.contiguous();
    crate::model::cuda_lora::backward(&c(x)?, &c(w)?, &c(a)?, &c(b)?, sel, scale as f32, &c(g)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Selection,
    _: f64,
    _: &Tensor,
) -> Result<Grads> {
    candle_core::bail!("lora-heads: this binary was built without the `cuda` feature")
}

/// The CPU definition of [`forward`]: composed candle ops in f32, returned in
/// `x`'s dtype. Runs on any device.
pub fn reference_forward(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    sel: &Selection,
    scale: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let [x, w, a, b] = [x, w, a, b].map(|t| t.to_dtype(DType::F32));
    let (x, w, a, b) = (x?, w?, a?, b?);
    let y = x.matmul(&w.t()?)?;
    let x_sel = match &sel.cols {
        Some(cols) => x.index_select(cols, 1)?,
        None => x,
    };
    let delta = (x_sel.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
    let y = match &sel.rows {
        Some(rows) => y.index_add(rows, &delta, 1)?,
        None => (y + delta)?,
    };
    y.to_dtype(dtype)
}

/// The CPU definition of [`backward`], as [`reference_forward`] is of [`forward`].
pub fn reference_backward(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    sel: &Selection,
    scale: f64,
    g: &Tensor,
) -> Result<Grads> {
    let dtype = x.dtype();
    let [x, w, a, b, g] = [x, w, a, b, g].map(|t| t.to_dtype(DType::F32));
    let (x, w, a, b, g) = (x?, w?, a?, b?, g?);
    let x_sel = match &sel.cols {
        Some(cols) => x.index_select(cols, 1)?,
        None => x,
    };
    let g_sel = match &sel.rows {
        Some(rows) => g.index_select(rows, 1)?,
        None => g.clone(),
    };
    let gb = g_sel.matmul(&b)?;
    let dx_adapter = (gb.matmul(&a)? * scale)?;
    let dx = g.matmul(&w)?;
    let dx = match &sel.cols {
        Some(cols) => dx.index_add(cols, &dx_adapter, 1)?,
        None => (dx + dx_adapter)?,
    };
    let da = (gb.t()?.matmul(&x_sel)? * scale)?;
    let t = x_sel.matmul(&a.t()?)?;
    let db = (g_sel.t()?.matmul(&t)? * scale)?;
    Ok(Grads { dx: dx.to_dtype(dtype)?, da: da.to_dtype(dtype)?, db: db.to_dtype(dtype)? })
}

/// [`forward`] as a custom op on `(x, A, B)`.
struct HeadLora {
    w: Tensor,
    sel: Selection,
    scale: f64,
}

/// A CPU tensor over a copy of a custom op's f32 or bf16 input.
fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("lora-heads: expected a contiguous input")
    };
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.dims(), &Device::Cpu),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], layout.dims(), &Device::Cpu),
        other => candle_core::bail!("lora-heads: expected f32 or bf16, got {:?}", other.dtype()),
    }
}

impl CustomOp3 for HeadLora {
    fn name(&self) -> &'static str {
        "lora-heads"
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
        let (x, a, b) =
            (cpu_tensor(x, x_layout)?, cpu_tensor(a, a_layout)?, cpu_tensor(b, b_layout)?);
        let sel = self.sel.to_device(&Device::Cpu)?;
        let w = self.w.to_device(&Device::Cpu)?;
        let y = reference_forward(&x, &w, &a, &b, &sel, self.scale)?;
        // A fresh tensor: its storage is exactly its elements, in order.
        let shape = y.shape().clone();
        let (storage, _) = y.storage_and_layout();
        let Storage::Cpu(data) = &*storage else { candle_core::bail!("lora-heads: expected CPU") };
        Ok((data.clone(), shape))
    }

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
        let inputs = crate::model::cuda_lora::Inputs { x, x_layout, a, a_layout, b, b_layout };
        crate::model::cuda_lora::forward(&inputs, &self.w, &self.sel, self.scale as f32)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x_val, a_val, b_val) = (x.detach(), a.detach(), b.detach());
        let grads = backward(&x_val, &self.w, &a_val, &b_val, &self.sel, self.scale, grad)?;
        let keep = |t: &Tensor, grad: Tensor| t.track_op().then_some(grad);
        Ok((keep(x, grads.dx), keep(a, grads.da), keep(b, grads.db)))
    }
}
