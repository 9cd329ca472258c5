//! The CUDA side of [`crate::model::lora_kernels`]: `kernels/lora.cu`
//! compiled with NVRTC once per process, loaded once per device, and launched
//! on candle's CUDA storage.
//!
//! The base products (`x W^T` forward, `g W` backward) are cuBLAS matmuls
//! through candle; the kernels then add the adapter term into that output in
//! place, one pass over the touched columns. The backward pass runs six
//! launches besides its matmul: `dx` with `u = g[:, rows] B` kept on the
//! side, `t = x[:, cols] A^T`, and `dA` and `dB` each as token-chunked
//! partial sums and then their sum in a fixed order (no atomics, so the
//! bytes do not depend on scheduling).
//!
//! The PTX targets NVRTC's default virtual architecture and the driver
//! compiles it for the device when the module loads. The NVRTC library found
//! at run time must not be newer than the driver, or the driver rejects the
//! PTX it emits.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use crate::model::lora_kernels::{
    Grads, KERNEL_SOURCE, MAX_RANK, OUTER_TOKENS, Selection, THREADS, TILE_TOKENS,
};

/// The module name under which candle caches the loaded kernels per device.
const MODULE: &str = "watchfire_lora";

/// The PTX of `kernels/lora.cu`, compiled on first use. NVRTC needs no GPU,
/// so this also runs (and is tested) on a machine without one.
pub fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        let opts = CompileOptions { name: Some("lora.cu".into()), ..Default::default() };
        compile_ptx_with_opts(KERNEL_SOURCE, opts)
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("NVRTC could not compile kernels/lora.cu: {e}"))
    });
    compiled.as_deref().map_err(|e| candle_core::Error::Msg(e.to_string()))
}

static POISON: AtomicBool = AtomicBool::new(false);

/// For tests: fill every buffer that a kernel must overwrite entirely (the
/// gradients of `A` and `B`, the low-rank activations, the partial sums) with
/// NaN instead of zero before the launch, so an entry a kernel skips shows up
/// as NaN in a comparison instead of passing as a plausible zero.
pub fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// The element types the kernels take, with their entry-point suffix.
trait Elem: DeviceRepr + ValidAsZeroBits + CudaDType + Clone {
    const SUFFIX: &'static str;
    const NAN: Self;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const NAN: Self = f32::NAN;
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const NAN: Self = half::bf16::NAN;
}

/// A buffer of `len` elements that a kernel will overwrite: zeros, or NaN under [`set_poison`].
fn output<T: Elem>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    if POISON.load(Ordering::Relaxed) {
        return dev.clone_htod(vec![T::NAN; len].as_slice());
    }
    dev.alloc_zeros::<T>(len)
}

/// A custom op's three inputs, as candle hands them to `cuda_fwd`.
pub struct Inputs<'a> {
    pub x: &'a CudaStorage,
    pub x_layout: &'a Layout,
    pub a: &'a CudaStorage,
    pub a_layout: &'a Layout,
    pub b: &'a CudaStorage,
    pub b_layout: &'a Layout,
}

/// A contiguous view of a storage's elements under `layout`.
fn view<'a, T: Elem>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("lora-heads: expected a contiguous tensor, got {:?}", layout.stride())
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// The CUDA storage and layout behind a tensor, held for a launch.
fn cuda_storage(t: &Tensor) -> Result<(std::sync::RwLockReadGuard<'_, Storage>, Layout)> {
    let (storage, layout) = t.storage_and_layout();
    if !matches!(&*storage, Storage::Cuda(_)) {
        candle_core::bail!("lora-heads: expected a CUDA tensor, got {:?}", t.device().location());
    }
    Ok((storage, layout.clone()))
}

fn as_cuda(storage: &Storage) -> &CudaStorage {
    match storage {
        Storage::Cuda(s) => s,
        _ => unreachable!("checked by cuda_storage"),
    }
}

/// A null pointer argument: the kernels read it as "every index" or "no output".
static NULL: u64 = 0;

/// Pushes an optional index list (u32 on the device) or a null pointer.
fn push_index<'a, 'v: 'a>(builder: &mut LaunchArgs<'a>, index: &'a Option<CudaView<'v, u32>>) {
    match index {
        Some(v) => builder.arg(v),
        None => builder.arg(&NULL),
    };
}

fn index_view<'a>(
    index: &'a Option<(std::sync::RwLockReadGuard<'a, Storage>, Layout)>,
) -> Result<Option<CudaView<'a, u32>>> {
    let Some((storage, layout)) = index else { return Ok(None) };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("lora-heads: expected a contiguous index list")
    };
    Ok(Some(as_cuda(storage).as_cuda_slice::<u32>()?.slice(start..end)))
}

fn hold(
    index: &Option<Tensor>,
) -> Result<Option<(std::sync::RwLockReadGuard<'_, Storage>, Layout)>> {
    index.as_ref().map(cuda_storage).transpose()
}

/// The arguments of one `low_rank_add` launch (see `kernels/lora.cu`):
/// `t = in[:, in_idx] R^T`, then `out[:, out_idx] += s t E^T` when `out` is
/// given, and `t` into `low` when that is given.
struct LowRank<'a, T> {
    out_stride: i64,
    n_out: usize,
    input: CudaView<'a, T>,
    in_stride: i64,
    in_idx: &'a Option<CudaView<'a, u32>>,
    n_in: usize,
    r: CudaView<'a, T>,
    r_strides: (i64, i64),
    e: CudaView<'a, T>,
    e_strides: (i64, i64),
    tokens: usize,
    rank: usize,
    scale: f32,
}

fn launch_low_rank<T: Elem>(
    dev: &CudaDevice,
    args: &LowRank<'_, T>,
    out: Option<&mut CudaSlice<T>>,
    out_idx: &Option<CudaView<'_, u32>>,
    low: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    if args.tokens == 0 {
        return Ok(());
    }
    let (n_out, n_in) = (args.n_out as i32, args.n_in as i32);
    let (tokens, rank) = (args.tokens as i32, args.rank as i32);
    let func =
        dev.get_or_load_custom_func(&format!("low_rank_add_{}", T::SUFFIX), MODULE, ptx()?)?;
    let mut builder = func.builder();
    match out {
        Some(out) => builder.arg(out),
        None => builder.arg(&NULL),
    };
    builder.arg(&args.out_stride);
    push_index(&mut builder, out_idx);
    builder.arg(&n_out);
    builder.arg(&args.input);
    builder.arg(&args.in_stride);
    push_index(&mut builder, args.in_idx);
    builder.arg(&n_in);
    builder.arg(&args.r);
    builder.arg(&args.r_strides.0);
    builder.arg(&args.r_strides.1);
    builder.arg(&args.e);
    builder.arg(&args.e_strides.0);
    builder.arg(&args.e_strides.1);
    match low {
        Some(low) => builder.arg(low),
        None => builder.arg(&NULL),
    };
    builder.arg(&tokens);
    builder.arg(&rank);
    builder.arg(&args.scale);
    let cfg = LaunchConfig {
        grid_dim: (args.tokens.div_ceil(TILE_TOKENS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches `low_rank_add_*`'s signature. Every
    // view is contiguous and was sized from checked `Dims`: `input` holds
    // `tokens x in_stride`, `out` `tokens x out_stride`, R and E address
    // `rank x n_in` and `n_out x rank` entries through their strides, `low`
    // holds `tokens x rank`, and index entries are below the strides.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// `P = s M[:, idx]^T L` into `out`, entry `(j, k)` at `j * o_j + k * o_k`.
#[allow(clippy::too_many_arguments)] // One launch pair's arguments, named as in the kernel.
fn launch_outer<T: Elem>(
    dev: &CudaDevice,
    out: &mut CudaSlice<T>,
    o_strides: (i64, i64),
    m: &CudaView<'_, T>,
    m_stride: i64,
    idx: &Option<CudaView<'_, u32>>,
    n: usize,
    l: &CudaSlice<f32>,
    tokens: usize,
    rank: usize,
    scale: f32,
) -> Result<()> {
    let chunks = tokens.div_ceil(OUTER_TOKENS);
    if n == 0 {
        return Ok(());
    }
    // At least one (zero) chunk, so that no tokens gives zero gradients.
    let chunks = chunks.max(1);
    let mut partial = output::<f32>(dev, chunks * n * rank)?;
    let (n_i, tokens_i, rank_i, chunks_i) = (n as i32, tokens as i32, rank as i32, chunks as i32);
    let func =
        dev.get_or_load_custom_func(&format!("outer_partial_{}", T::SUFFIX), MODULE, ptx()?)?;
    let mut builder = func.builder();
    builder.arg(&mut partial);
    builder.arg(m);
    builder.arg(&m_stride);
    push_index(&mut builder, idx);
    builder.arg(&n_i);
    builder.arg(l);
    builder.arg(&tokens_i);
    builder.arg(&rank_i);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize) as u32, chunks as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `outer_partial_*`; `partial` holds `chunks x n x rank`
    // f32, `m` `tokens x m_stride`, `l` `tokens x rank`, and index entries are
    // below `m_stride`.
    unsafe { builder.launch(cfg) }.w()?;

    let func =
        dev.get_or_load_custom_func(&format!("outer_finish_{}", T::SUFFIX), MODULE, ptx()?)?;
    let mut builder = func.builder();
    builder.arg(out);
    builder.arg(&o_strides.0);
    builder.arg(&o_strides.1);
    builder.arg(&partial);
    builder.arg(&chunks_i);
    builder.arg(&n_i);
    builder.arg(&rank_i);
    builder.arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: ((n * rank).div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `outer_finish_*`; `out` holds `n x rank` entries, which
    // `(o_j, o_k)` address as `[n, rank]` or `[rank, n]`.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// The forward pass of `lora-heads` on CUDA (`x` `[tokens, in]`, `A`
/// `[r, n_cols]`, `B` `[n_rows, r]`): the cuBLAS product `x W^T`, then the
/// adapter added into its selected columns.
pub fn forward(
    inputs: &Inputs<'_>,
    w: &Tensor,
    sel: &Selection,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    match inputs.x.dtype() {
        DType::F32 => forward_typed::<f32>(inputs, w, sel, scale),
        DType::BF16 => forward_typed::<half::bf16>(inputs, w, sel, scale),
        other => candle_core::bail!("lora-heads: no CUDA kernel for {other:?}"),
    }
}

fn forward_typed<T: Elem>(
    inputs: &Inputs<'_>,
    w: &Tensor,
    sel: &Selection,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (tokens, inner) = inputs.x_layout.shape().dims2()?;
    let (rank, n_cols) = inputs.a_layout.shape().dims2()?;
    let (n_rows, _) = inputs.b_layout.shape().dims2()?;
    let (w_storage, w_layout) = cuda_storage(w)?;
    let out = w_layout.dims()[0];
    check_rank(rank)?;
    let dev = inputs.x.device();

    let mut y = inputs.x.matmul(
        as_cuda(&w_storage),
        (1, tokens, out, inner),
        inputs.x_layout,
        &w_layout.transpose(0, 1)?,
    )?;
    let (rows, cols) = (hold(&sel.rows)?, hold(&sel.cols)?);
    let (rows, cols) = (index_view(&rows)?, index_view(&cols)?);
    let args = LowRank {
        out_stride: out as i64,
        n_out: n_rows,
        input: view::<T>(inputs.x, inputs.x_layout)?,
        in_stride: inner as i64,
        in_idx: &cols,
        n_in: n_cols,
        r: view::<T>(inputs.a, inputs.a_layout)?,
        r_strides: (n_cols as i64, 1),
        e: view::<T>(inputs.b, inputs.b_layout)?,
        e_strides: (rank as i64, 1),
        tokens,
        rank,
        scale,
    };
    launch_low_rank(dev, &args, Some(y.as_cuda_slice_mut::<T>()?), &rows, None)?;
    Ok((y, Shape::from((tokens, out))))
}

fn check_rank(rank: usize) -> Result<()> {
    if !(1..=MAX_RANK).contains(&rank) {
        candle_core::bail!("lora-heads: rank {rank} is outside the kernels' 1..={MAX_RANK}");
    }
    Ok(())
}

/// The forward pass of `ops::lora_linear` (full-size `A` `[r, in]` and `B`
/// `[out, r]`, `x` `[.., in]`) on CUDA: the same kernel with every feature
/// selected. Rows of `B` that are all zero (the heads a per-head adapter
/// leaves alone) are skipped, so they cost no traffic.
pub fn lora_linear_fwd(
    w: &Tensor,
    scale: f32,
    inputs: &Inputs<'_>,
) -> Result<(CudaStorage, Shape)> {
    let dims = inputs.x_layout.dims();
    let inner = *dims.last().unwrap_or(&0);
    let tokens = inputs.x_layout.shape().elem_count() / inner.max(1);
    let x_layout = Layout::contiguous_with_offset((tokens, inner), inputs.x_layout.start_offset());
    if !inputs.x_layout.is_contiguous() {
        candle_core::bail!("lora-linear: expected a contiguous input");
    }
    let (rank, a_inner) = inputs.a_layout.shape().dims2()?;
    let (out, b_rank) = inputs.b_layout.shape().dims2()?;
    if a_inner != inner || b_rank != rank || w.dims() != [out, inner] {
        candle_core::bail!(
            "lora-linear: x [.., {inner}], W {:?}, A [{rank}, {a_inner}], B [{out}, {b_rank}]",
            w.dims()
        );
    }
    let flat = Inputs { x_layout: &x_layout, ..*inputs };
    let (y, _) = forward(&flat, w, &Selection::all(), scale)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok((y, Shape::from(shape)))
}

/// The backward pass of `lora-heads` on CUDA; see
/// [`crate::model::lora_kernels::backward`]. All inputs contiguous.
pub fn backward(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    sel: &Selection,
    scale: f32,
    g: &Tensor,
) -> Result<Grads> {
    match x.dtype() {
        DType::F32 => backward_typed::<f32>(x, w, a, b, sel, scale, g),
        DType::BF16 => backward_typed::<half::bf16>(x, w, a, b, sel, scale, g),
        other => candle_core::bail!("lora-heads: no CUDA kernel for {other:?}"),
    }
}

fn wrap<T: Elem>(slice: CudaSlice<T>, dev: &CudaDevice, shape: (usize, usize)) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn backward_typed<T: Elem>(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    sel: &Selection,
    scale: f32,
    g: &Tensor,
) -> Result<Grads> {
    let (tokens, inner) = x.dims2()?;
    let (out, _) = w.dims2()?;
    let (rank, n_cols) = a.dims2()?;
    let (n_rows, _) = b.dims2()?;
    check_rank(rank)?;
    let ((xs, xl), (ws, wl), (as_, al)) = (cuda_storage(x)?, cuda_storage(w)?, cuda_storage(a)?);
    let ((bs, bl), (gs, gl)) = (cuda_storage(b)?, cuda_storage(g)?);
    let (xs, ws, as_, bs, gs) =
        (as_cuda(&xs), as_cuda(&ws), as_cuda(&as_), as_cuda(&bs), as_cuda(&gs));
    let dev = xs.device();
    let (rows, cols) = (hold(&sel.rows)?, hold(&sel.cols)?);
    let (rows, cols) = (index_view(&rows)?, index_view(&cols)?);

    // dx = g W, then + s (g[:, rows] B) A into its selected columns, keeping u = g[:, rows] B.
    let mut dx = gs.matmul(ws, (1, tokens, inner, out), &gl, &wl)?;
    let mut u = output::<f32>(dev, tokens * rank)?;
    let args = LowRank {
        out_stride: inner as i64,
        n_out: n_cols,
        input: view::<T>(gs, &gl)?,
        in_stride: out as i64,
        in_idx: &rows,
        n_in: n_rows,
        r: view::<T>(bs, &bl)?,
        r_strides: (1, rank as i64),
        e: view::<T>(as_, &al)?,
        e_strides: (1, n_cols as i64),
        tokens,
        rank,
        scale,
    };
    launch_low_rank(dev, &args, Some(dx.as_cuda_slice_mut::<T>()?), &cols, Some(&mut u))?;

    // t = x[:, cols] A^T, for dB.
    let mut t = output::<f32>(dev, tokens * rank)?;
    let args = LowRank {
        out_stride: 0,
        n_out: 0,
        input: view::<T>(xs, &xl)?,
        in_stride: inner as i64,
        in_idx: &cols,
        n_in: n_cols,
        r: view::<T>(as_, &al)?,
        r_strides: (n_cols as i64, 1),
        e: view::<T>(as_, &al)?,
        e_strides: (0, 0),
        tokens,
        rank,
        scale,
    };
    launch_low_rank(dev, &args, None, &None, Some(&mut t))?;

    // dA = s u^T x[:, cols] as [r, n_cols]; dB = s g[:, rows]^T t as [n_rows, r].
    let mut da = output::<T>(dev, rank * n_cols)?;
    let x_view = view::<T>(xs, &xl)?;
    let da_strides = (1, n_cols as i64);
    let (x_stride, g_stride) = (inner as i64, out as i64);
    launch_outer(
        dev, &mut da, da_strides, &x_view, x_stride, &cols, n_cols, &u, tokens, rank, scale,
    )?;
    let mut db = output::<T>(dev, n_rows * rank)?;
    let g_view = view::<T>(gs, &gl)?;
    let db_strides = (rank as i64, 1);
    launch_outer(
        dev, &mut db, db_strides, &g_view, g_stride, &rows, n_rows, &t, tokens, rank, scale,
    )?;

    let dx = Tensor::from_storage(Storage::Cuda(dx), (tokens, inner), BackpropOp::none(), false);
    Ok(Grads { dx, da: wrap(da, dev, (rank, n_cols)), db: wrap(db, dev, (n_rows, rank)) })
}
