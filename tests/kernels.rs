//! The per-head LoRA op against its definition, on every device this build
//! and machine have.
//!
//! One test body, [`check_device`], runs the op's forward and backward pass
//! and compares them with [`reference_forward`] and [`reference_backward`]
//! computed on the CPU in f32 from the same (dtype-rounded) inputs. It runs on
//! the CPU always and on CUDA when the binary is built with `cuda` and a
//! device answers. Every run draws fresh random inputs, and on CUDA every
//! buffer a kernel must overwrite starts as NaN. On the CPU, the reference
//! itself is checked against per-head LoRA composed the way `adapt::lora`
//! does it (full-size adapters from explicit 0/1 head masks), in plain candle
//! ops and with `ops::lora_linear`, gradients included.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use watchfire::model::lora_kernels::{
    Grads, Selection, backward, forward, reference_backward, reference_forward,
};
use watchfire::model::ops;

/// Which side of the projection the adapter is restricted to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// q/k/v: output rows of the selected heads.
    Rows,
    /// o: input columns of the selected heads.
    Cols,
    /// Full-size `A` and `B`, zero outside the selected heads' rows: what
    /// `ops::lora_linear` receives from `adapt::lora` today.
    Dense,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    tokens: usize,
    inner: usize,
    out: usize,
    rank: usize,
    head_dim: usize,
    /// Every `every`-th head (from head 1) is selected.
    every: usize,
    side: Side,
    scale: f64,
}

/// Shapes that cross every tile edge of the kernels: tokens not a multiple of
/// the 16-token tile nor of the 256-token chunk, inputs past one 256-wide
/// stage, ranks past one 16-rank chunk.
const CASES: [Case; 5] = [
    Case {
        tokens: 37,
        inner: 256,
        out: 256,
        rank: 8,
        head_dim: 32,
        every: 3,
        side: Side::Rows,
        scale: 2.0,
    },
    Case {
        tokens: 37,
        inner: 256,
        out: 256,
        rank: 16,
        head_dim: 32,
        every: 2,
        side: Side::Cols,
        scale: 0.5,
    },
    Case {
        tokens: 300,
        inner: 300,
        out: 120,
        rank: 20,
        head_dim: 20,
        every: 2,
        side: Side::Rows,
        scale: 1.0,
    },
    Case {
        tokens: 300,
        inner: 320,
        out: 192,
        rank: 33,
        head_dim: 32,
        every: 3,
        side: Side::Cols,
        scale: 1.5,
    },
    Case {
        tokens: 65,
        inner: 192,
        out: 160,
        rank: 4,
        head_dim: 32,
        every: 2,
        side: Side::Dense,
        scale: 2.0,
    },
];

/// Largest error relative to the largest reference entry, per dtype: f32 is
/// the same arithmetic in another order; bf16 rounds every stored value to 8
/// significant bits (relative 2^-9) and the inputs' rounding is shared.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1.5e-2,
        _ => 1e-4,
    }
}

struct Inputs {
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor,
    sel: Selection,
}

fn uniform(rng: &mut ChaCha8Rng, shape: (usize, usize), bound: f32) -> Result<Tensor> {
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-bound..bound)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

fn heads(case: &Case, features: usize) -> Vec<bool> {
    (0..features / case.head_dim).map(|h| h % case.every == 1).collect()
}

/// `[n, features]` with a 1 at `(i, index[i])`: row `i` of a compact matrix
/// lands at feature `index[i]`.
fn scatter(index: &[u32], features: usize) -> Result<Tensor> {
    let mut data = vec![0f32; index.len() * features];
    for (i, &f) in index.iter().enumerate() {
        data[i * features + f as usize] = 1.0;
    }
    Tensor::from_vec(data, (index.len(), features), &Device::Cpu)
}

/// Fresh inputs for one run, in f32 on the CPU.
fn inputs(case: &Case, seed: u64) -> Result<Inputs> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cpu = &Device::Cpu;
    let rows = Selection::head_features(&heads(case, case.out), case.head_dim);
    let cols = Selection::head_features(&heads(case, case.inner), case.head_dim);
    let (n_rows, n_cols, sel) = match case.side {
        Side::Rows => (rows.len(), case.inner, Selection::rows(&rows, cpu)?),
        Side::Cols => (case.out, cols.len(), Selection::cols(&cols, cpu)?),
        Side::Dense => (case.out, case.inner, Selection::all()),
    };
    let x = uniform(&mut rng, (case.tokens, case.inner), 1.0)?;
    let w = uniform(&mut rng, (case.out, case.inner), 0.1)?;
    let a = uniform(&mut rng, (case.rank, n_cols), 0.3)?;
    let mut b = uniform(&mut rng, (n_rows, case.rank), 0.3)?;
    if case.side == Side::Dense {
        // Zero outside the selected rows, as a per-head adapter's full-size B is.
        b = scatter(&rows, case.out)?.t()?.matmul(&scatter(&rows, case.out)?.matmul(&b)?)?;
    }
    let g = uniform(&mut rng, (case.tokens, case.out), 1.0)?;
    Ok(Inputs { x, w, a, b, g, sel })
}

/// `‖got - want‖∞ / ‖want‖∞`, NaN when `got` has a NaN.
fn rel_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let want = want.to_dtype(DType::F32)?;
    if got.dims() != want.dims() {
        candle_core::bail!("shape {:?}, expected {:?}", got.dims(), want.dims());
    }
    let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
    let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let worst = got.iter().zip(&want).fold(0f32, |m, (g, w)| {
        let d = (g - w).abs();
        if d.is_nan() || m.is_nan() { f32::NAN } else { m.max(d) }
    });
    Ok(worst / scale)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f32) -> Result<()> {
    let err = rel_error(got, want)?;
    assert!(err <= tolerance, "{what}: relative error {err:e} over {tolerance:e}");
    Ok(())
}

/// The test body: the op on `device` in `dtype` against the f32 reference on the CPU.
fn check_device(device: &Device, dtype: DType, case: &Case, seed: u64) -> Result<()> {
    let inp = inputs(case, seed)?;
    let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
    let (x, w, a, b, g) = (on(&inp.x)?, on(&inp.w)?, on(&inp.a)?, on(&inp.b)?, on(&inp.g)?);
    let sel = Selection {
        rows: inp.sel.rows.as_ref().map(|r| r.to_device(device)).transpose()?,
        cols: inp.sel.cols.as_ref().map(|c| c.to_device(device)).transpose()?,
    };
    // The reference sees exactly the values the device saw.
    let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let (rx, rw, ra, rb, rg) = (back(&x)?, back(&w)?, back(&a)?, back(&b)?, back(&g)?);

    let y = forward(&x, &w, &a, &b, &sel, case.scale)?;
    let grads = backward(&x, &w, &a, &b, &sel, case.scale, &g)?;
    let want_y = reference_forward(&rx, &rw, &ra, &rb, &inp.sel, case.scale)?;
    let want = reference_backward(&rx, &rw, &ra, &rb, &inp.sel, case.scale, &rg)?;

    let tol = tolerance(dtype);
    let what = |t: &str| format!("{t} on {:?} in {dtype:?}, {case:?}", device.location());
    assert_eq!(y.dtype(), dtype, "{}", what("y dtype"));
    assert_close(&what("y"), &y, &want_y, tol)?;
    assert_close(&what("dx"), &grads.dx, &want.dx, tol)?;
    assert_close(&what("dA"), &grads.da, &want.da, tol)?;
    assert_close(&what("dB"), &grads.db, &want.db, tol)?;
    Ok(())
}

/// The reference against per-head LoRA as `adapt::lora` composes it: the
/// compact adapter scattered into full-size `A` and `B` by explicit 0/1 head
/// masks, then `x W^T + s (x A^T) B^T` both in plain candle ops and with
/// `ops::lora_linear` (the training path's fused CPU op), gradients by
/// candle's autograd through the masks.
fn check_reference(case: &Case, seed: u64) -> Result<()> {
    let inp = inputs(case, seed)?;
    let mask = |index: &Option<Tensor>, features: usize| -> Result<Option<Tensor>> {
        index.as_ref().map(|i| scatter(&i.to_vec1::<u32>()?, features)).transpose()
    };
    let (rows_mask, cols_mask) = (mask(&inp.sel.rows, case.out)?, mask(&inp.sel.cols, case.inner)?);
    let x = Var::from_tensor(&inp.x)?;
    let (a, b) = (Var::from_tensor(&inp.a)?, Var::from_tensor(&inp.b)?);
    let a_full = match &cols_mask {
        Some(m) => a.as_tensor().matmul(m)?,
        None => a.as_tensor().clone(),
    };
    let b_full = match &rows_mask {
        Some(m) => m.t()?.matmul(b.as_tensor())?,
        None => b.as_tensor().clone(),
    };
    let base = x.as_tensor().matmul(&inp.w.t()?)?;
    let adapter = x.as_tensor().matmul(&a_full.t()?)?.matmul(&b_full.t()?)?;
    let y = (base + (adapter * case.scale)?)?;
    let grads = (y.clone() * &inp.g)?.sum_all()?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).cloned().expect("a gradient");

    let want_y = reference_forward(&inp.x, &inp.w, &inp.a, &inp.b, &inp.sel, case.scale)?;
    let want = reference_backward(&inp.x, &inp.w, &inp.a, &inp.b, &inp.sel, case.scale, &inp.g)?;
    let what = |t: &str| format!("{t}: masked composition vs reference, {case:?}");
    let tol = tolerance(DType::F32);
    assert_close(&what("y"), &y, &want_y, tol)?;
    assert_close(&what("dx"), &grad(&x), &want.dx, tol)?;
    assert_close(&what("dA"), &grad(&a), &want.da, tol)?;
    assert_close(&what("dB"), &grad(&b), &want.db, tol)?;

    // The training path's fused CPU op on the same full-size adapter.
    let fused = ops::lora_linear(x.as_tensor(), &inp.w, &a_full, &b_full, case.scale)?;
    let grads = (fused.clone() * &inp.g)?.sum_all()?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).cloned().expect("a gradient");
    let what = |t: &str| format!("{t}: ops::lora_linear vs reference, {case:?}");
    assert_close(&what("y"), &fused, &want_y, tol)?;
    assert_close(&what("dx"), &grad(&x), &want.dx, tol)?;
    assert_close(&what("dA"), &grad(&a), &want.da, tol)?;
    assert_close(&what("dB"), &grad(&b), &want.db, tol)?;
    Ok(())
}

/// The op's own autograd wiring: gradients through `forward` and `backward()`
/// equal [`backward`] called directly.
fn check_autograd(device: &Device, case: &Case, seed: u64) -> Result<()> {
    let inp = inputs(case, seed)?;
    let on = |t: &Tensor| t.to_device(device);
    let x = Var::from_tensor(&on(&inp.x)?)?;
    let (a, b) = (Var::from_tensor(&on(&inp.a)?)?, Var::from_tensor(&on(&inp.b)?)?);
    let (w, g) = (on(&inp.w)?, on(&inp.g)?);
    let sel = Selection {
        rows: inp.sel.rows.as_ref().map(|r| r.to_device(device)).transpose()?,
        cols: inp.sel.cols.as_ref().map(|c| c.to_device(device)).transpose()?,
    };
    let y = forward(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), &sel, case.scale)?;
    let grads = (y * &g)?.sum_all()?.backward()?;
    let Grads { dx, da, db } =
        backward(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), &sel, case.scale, &g)?;
    let grad = |v: &Var| grads.get(v.as_tensor()).cloned().expect("a gradient");
    let what = |t: &str| format!("{t}: autograd vs backward on {:?}", device.location());
    assert_close(&what("dx"), &grad(&x), &dx, tolerance(DType::F32))?;
    assert_close(&what("dA"), &grad(&a), &da, tolerance(DType::F32))?;
    assert_close(&what("dB"), &grad(&b), &db, tolerance(DType::F32))?;
    Ok(())
}

/// The CUDA device when this build has the backend and the machine has a GPU.
/// With `WATCHFIRE_REQUIRE_CUDA` set (as `kernels/gpu-check.sh` sets it), not
/// finding one fails the test instead.
fn cuda_device() -> Option<Device> {
    let required = std::env::var_os("WATCHFIRE_REQUIRE_CUDA").is_some();
    let skip = |why: String| {
        assert!(!required, "WATCHFIRE_REQUIRE_CUDA is set but {why}");
        eprintln!("kernels: {why}, the CUDA half of the test did not run");
        None
    };
    if !cfg!(feature = "cuda") {
        return skip("this binary was built without the `cuda` feature".into());
    }
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => skip(format!("no CUDA device could be opened ({e})")),
    }
}

#[test]
fn per_head_lora_matches_its_reference_on_every_device() -> Result<()> {
    let mut seed = 0x6c6f7261;
    let mut next = || {
        seed += 1;
        seed
    };
    for case in &CASES {
        check_reference(case, next())?;
        check_autograd(&Device::Cpu, case, next())?;
        for dtype in [DType::F32, DType::BF16] {
            check_device(&Device::Cpu, dtype, case, next())?;
        }
    }
    let Some(cuda) = cuda_device() else { return Ok(()) };
    set_poison(true);
    for case in &CASES {
        check_autograd(&cuda, case, next())?;
        for dtype in [DType::F32, DType::BF16] {
            check_device(&cuda, dtype, case, next())?;
        }
    }
    set_poison(false);
    Ok(())
}

#[cfg(feature = "cuda")]
fn set_poison(on: bool) {
    watchfire::model::cuda_lora::set_poison(on);
}

#[cfg(not(feature = "cuda"))]
fn set_poison(_: bool) {}

#[test]
fn head_features_are_the_selected_heads_rows() {
    let features = Selection::head_features(&[false, true, false, true], 3);
    assert_eq!(features, [3, 4, 5, 9, 10, 11]);
}

#[test]
fn the_kernel_source_hash_is_blake3_of_the_source() {
    let hash = watchfire::model::lora_kernels::kernel_source_hash();
    let source = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/lora.cu")).unwrap();
    assert_eq!(hash, blake3::hash(&source).to_hex().to_string());
}

/// NVRTC compiles the kernels without a GPU, so a CUDA build checks the
/// source on any machine that has the NVRTC library.
#[cfg(feature = "cuda")]
#[test]
fn nvrtc_compiles_every_entry_point() {
    let ptx = watchfire::model::cuda_lora::ptx().expect("NVRTC compiles kernels/lora.cu");
    for kernel in ["low_rank_add", "outer_partial", "outer_finish"] {
        for suffix in ["f32", "bf16"] {
            let entry = format!(".entry {kernel}_{suffix}(");
            assert!(ptx.contains(&entry), "the PTX lacks {entry}");
        }
    }
}

#[test]
fn shapes_the_kernels_cannot_take_are_errors() -> Result<()> {
    let cpu = &Device::Cpu;
    let x = Tensor::zeros((4, 8), DType::F32, cpu)?;
    let w = Tensor::zeros((6, 8), DType::F32, cpu)?;
    let sel = Selection::rows(&[0, 1, 2], cpu)?;
    let a = Tensor::zeros((2, 8), DType::F32, cpu)?;
    let b = Tensor::zeros((3, 2), DType::F32, cpu)?;
    assert!(forward(&x, &w, &a, &b, &sel, 1.0).is_ok());
    // B's rows must be the selected rows; A's columns all of x's.
    let b_all = Tensor::zeros((6, 2), DType::F32, cpu)?;
    assert!(forward(&x, &w, &a, &b_all, &sel, 1.0).is_err());
    assert!(forward(&x, &w, &a.narrow(1, 0, 4)?, &b, &sel, 1.0).is_err());
    // Rank above the kernels' accumulators.
    let (a_wide, b_wide) =
        (Tensor::zeros((65, 8), DType::F32, cpu)?, Tensor::zeros((3, 65), DType::F32, cpu)?);
    assert!(forward(&x, &w, &a_wide, &b_wide, &sel, 1.0).is_err());
    // The output gradient must match y.
    let g = Tensor::zeros((4, 5), DType::F32, cpu)?;
    assert!(backward(&x, &w, &a, &b, &sel, 1.0, &g).is_err());
    Ok(())
}

/// The Rust side launches `kernels/lora.cu` with the geometry its `#define`s assume.
#[test]
fn launch_geometry_matches_the_kernel_source() {
    use watchfire::model::lora_kernels::{
        KERNEL_SOURCE, MAX_RANK, OUTER_TOKENS, THREADS, TILE_TOKENS,
    };
    let define = |name: &str| -> usize {
        let line = KERNEL_SOURCE
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("kernels/lora.cu defines no {name}"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert_eq!(THREADS as usize, define("WARPS") * 32);
    assert_eq!(TILE_TOKENS, define("WARPS") * define("WARP_TOKENS"));
    assert_eq!(OUTER_TOKENS, define("OUTER_TOKENS"));
    assert_eq!(MAX_RANK, define("MAX_RANK"));
}
