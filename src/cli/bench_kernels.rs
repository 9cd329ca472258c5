//! `watchfire bench kernels`: the per-head LoRA kernels of `kernels/lora.cu`
//! checked against their CPU reference and timed against the unfused candle
//! composition, at the shapes of issue 6 (hidden 4096, 32 heads of 128,
//! rank 16, a quarter of the heads, 8,192 tokens) and of SmolLM2-135M (576,
//! 9 heads of 64).
//!
//! For each shape and dtype it prints the largest relative error of the
//! forward output and of `dx`, `dA` and `dB` on `--check-tokens` tokens, then
//! the fused and unfused times. "adapter" rows subtract the cuBLAS base
//! product (`x W^T`, `g W`), which both paths share, and rate the rest against
//! the least traffic the adapter term needs: the selected columns of the
//! input read once, the selected columns of the output read and written once.
//! Ceilings are measured first: a device-to-device copy of 1 GiB for
//! bandwidth, an 8192^3 cuBLAS matmul per dtype for FLOP/s.
//!
//! `--device cpu` runs the same code with the CPU op (which is the reference)
//! so the command itself can be checked on a machine without a GPU; its
//! figures say nothing about the kernels.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor};
use clap::{Args, ValueEnum};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use watchfire::model::lora_kernels::{
    Selection, backward, forward, kernel_source_hash, reference_backward, reference_forward,
};

#[derive(Args)]
pub struct BenchKernelsArgs {
    /// Where the op runs: `cuda` (the kernels; needs a build with `--features cuda`) or `cpu`.
    #[arg(long, value_enum, default_value_t = KernelDevice::Cuda)]
    pub device: KernelDevice,
    /// Timed repetitions of each measurement (the median is printed).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Tokens of the timed shapes.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Tokens of the correctness checks against the CPU reference.
    #[arg(long, default_value_t = 256)]
    pub check_tokens: usize,
    /// Run the correctness checks only.
    #[arg(long)]
    pub check_only: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelDevice {
    Cpu,
    Cuda,
}

/// One benchmarked projection.
struct Shape {
    name: &'static str,
    hidden: usize,
    heads: usize,
    rank: usize,
    /// Output rows of the selected heads (q/k/v) or input columns (o).
    rows: bool,
}

const SHAPES: [Shape; 4] = [
    Shape { name: "4096 q", hidden: 4096, heads: 32, rank: 16, rows: true },
    Shape { name: "4096 o", hidden: 4096, heads: 32, rank: 16, rows: false },
    Shape { name: "576 q", hidden: 576, heads: 9, rank: 16, rows: true },
    Shape { name: "576 o", hidden: 576, heads: 9, rank: 16, rows: false },
];

/// The largest relative error each dtype may show against the f32 reference
/// (as in `tests/kernels.rs`).
fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::BF16 { 1.5e-2 } else { 1e-4 }
}

/// Inputs of one shape, in f32 on the CPU: every fourth head selected.
struct Inputs {
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor,
    features: Vec<u32>,
    /// `A` and `B` at full size, zero outside the selected heads: what the
    /// unfused composition multiplies.
    a_full: Tensor,
    b_full: Tensor,
}

fn uniform(rng: &mut ChaCha8Rng, shape: (usize, usize), bound: f32) -> Result<Tensor> {
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-bound..bound)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

fn inputs(shape: &Shape, tokens: usize, seed: u64) -> Result<Inputs> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let head_dim = shape.hidden / shape.heads;
    let heads: Vec<bool> = (0..shape.heads).map(|h| h % 4 == 0).collect();
    let features = Selection::head_features(&heads, head_dim);
    let (n, h) = (features.len(), shape.hidden);
    let x = uniform(&mut rng, (tokens, h), 1.0)?;
    let w = uniform(&mut rng, (h, h), 1.0 / (h as f32).sqrt())?;
    let a = uniform(&mut rng, (shape.rank, if shape.rows { h } else { n }), 0.05)?;
    let b = uniform(&mut rng, (if shape.rows { n } else { h }, shape.rank), 0.05)?;
    let g = uniform(&mut rng, (tokens, h), 1.0)?;
    let index = Tensor::new(features.as_slice(), &Device::Cpu)?;
    let (a_full, b_full) = if shape.rows {
        let zeros = Tensor::zeros((h, shape.rank), DType::F32, &Device::Cpu)?;
        (a.clone(), zeros.index_add(&index, &b, 0)?)
    } else {
        let zeros = Tensor::zeros((shape.rank, h), DType::F32, &Device::Cpu)?;
        (zeros.index_add(&index, &a, 1)?, b.clone())
    };
    Ok(Inputs { x, w, a, b, g, features, a_full, b_full })
}

/// `inputs` in `dtype` on `device`, with the selection there too.
struct Placed {
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor,
    a_full: Tensor,
    b_full: Tensor,
    sel: Selection,
}

fn place(inp: &Inputs, shape: &Shape, dtype: DType, device: &Device) -> Result<Placed> {
    let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
    let sel = if shape.rows {
        Selection::rows(&inp.features, device)?
    } else {
        Selection::cols(&inp.features, device)?
    };
    Ok(Placed {
        x: on(&inp.x)?,
        w: on(&inp.w)?,
        a: on(&inp.a)?,
        b: on(&inp.b)?,
        g: on(&inp.g)?,
        a_full: on(&inp.a_full)?,
        b_full: on(&inp.b_full)?,
        sel,
    })
}

pub fn bench_kernels(args: BenchKernelsArgs) -> miette::Result<ExitCode> {
    let device = open(args.device)?;
    let fail = |err: candle_core::Error| miette::miette!("{err}");
    println!(
        "watchfire {} bench kernels on {:?}, kernels/lora.cu blake3 {}",
        env!("CARGO_PKG_VERSION"),
        device.location(),
        &kernel_source_hash()[..16]
    );
    let mut failures = 0;
    println!(
        "\ncorrectness, {} tokens, largest error relative to the largest reference entry",
        args.check_tokens
    );
    for shape in &SHAPES {
        for dtype in [DType::F32, DType::BF16] {
            failures += check(shape, dtype, &device, args.check_tokens).map_err(fail)?;
        }
    }
    if !args.check_only {
        timings(&args, &device).map_err(fail)?;
    }
    if failures > 0 {
        println!("\n{failures} correctness check(s) over tolerance");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn open(device: KernelDevice) -> miette::Result<Device> {
    match device {
        KernelDevice::Cpu => Ok(Device::Cpu),
        KernelDevice::Cuda if !cfg!(feature = "cuda") => Err(miette::miette!(
            help = "build with `cargo build --release --no-default-features --features cuda`; \
                    the book's Kernels chapter says how to build it without a GPU",
            "this binary was built without the `cuda` feature, so it has no CUDA kernels"
        )),
        KernelDevice::Cuda => Device::new_cuda(0)
            .map_err(|err| miette::miette!("no CUDA device could be opened: {err}")),
    }
}

/// Prints one line of errors; returns the number of outputs over tolerance.
fn check(shape: &Shape, dtype: DType, device: &Device, tokens: usize) -> Result<usize> {
    let inp = inputs(shape, tokens, 7)?;
    let p = place(&inp, shape, dtype, device)?;
    let back = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let (x, w, a, b, g) = (back(&p.x)?, back(&p.w)?, back(&p.a)?, back(&p.b)?, back(&p.g)?);
    let cpu_sel = if shape.rows {
        Selection::rows(&inp.features, &Device::Cpu)?
    } else {
        Selection::cols(&inp.features, &Device::Cpu)?
    };
    let scale = 2.0;
    let y = forward(&p.x, &p.w, &p.a, &p.b, &p.sel, scale)?;
    let grads = backward(&p.x, &p.w, &p.a, &p.b, &p.sel, scale, &p.g)?;
    let want_y = reference_forward(&x, &w, &a, &b, &cpu_sel, scale)?;
    let want = reference_backward(&x, &w, &a, &b, &cpu_sel, scale, &g)?;
    let pairs =
        [(&y, &want_y), (&grads.dx, &want.dx), (&grads.da, &want.da), (&grads.db, &want.db)];
    let mut errors = Vec::with_capacity(4);
    for (got, want) in pairs {
        errors.push(rel_error(got, want)?);
    }
    let over = errors.iter().filter(|e| e.is_nan() || **e > tolerance(dtype)).count();
    println!(
        "  {:<8} {:<5} y {:.1e}  dx {:.1e}  dA {:.1e}  dB {:.1e}  (bound {:.1e}) {}",
        shape.name,
        dtype_name(dtype),
        errors[0],
        errors[1],
        errors[2],
        errors[3],
        tolerance(dtype),
        if over == 0 { "ok" } else { "OVER" }
    );
    Ok(over)
}

fn rel_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    let got: Vec<f32> =
        got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
    let scale = want.iter().fold(0f64, |m, v| m.max(f64::from(v.abs()))).max(f64::MIN_POSITIVE);
    let worst = got.iter().zip(&want).fold(0f64, |m, (g, w)| {
        let d = f64::from((g - w).abs());
        if d.is_nan() || m.is_nan() { f64::NAN } else { m.max(d) }
    });
    Ok(worst / scale)
}

fn dtype_name(dtype: DType) -> &'static str {
    if dtype == DType::BF16 { "bf16" } else { "f32" }
}

/// Median wall time of `f` over `runs` runs after two warm-up runs, the
/// device synchronised around each.
fn time(device: &Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    for _ in 0..2 {
        f()?;
    }
    device.synchronize()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        samples.push(start.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// The dtypes timed on `device`: candle's CPU matmul has no bf16.
fn timed_dtypes(device: &Device) -> Vec<DType> {
    if device.is_cpu() { vec![DType::F32] } else { vec![DType::F32, DType::BF16] }
}

/// What the device can do at best: copy bandwidth and matmul rate per dtype.
struct Ceilings {
    bytes_per_s: f64,
    flops_f32: f64,
    flops_bf16: f64,
}

fn ceilings(device: &Device, runs: usize) -> Result<Ceilings> {
    let big = if device.is_cpu() { 1 << 26 } else { 1 << 30 };
    let buffer = Tensor::zeros(big, DType::U8, device)?;
    let copy = time(device, runs, || buffer.copy().map(drop))?;
    let n = if device.is_cpu() { 1024 } else { 8192 };
    let mut flops = [f64::NAN; 2];
    for (slot, dtype) in flops.iter_mut().zip(timed_dtypes(device)) {
        let m = Tensor::ones((n, n), dtype, device)?;
        let t = time(device, runs, || m.matmul(&m).map(drop))?;
        *slot = 2.0 * (n as f64).powi(3) / t.as_secs_f64();
    }
    Ok(Ceilings {
        bytes_per_s: 2.0 * big as f64 / copy.as_secs_f64(),
        flops_f32: flops[0],
        flops_bf16: flops[1],
    })
}

fn timings(args: &BenchKernelsArgs, device: &Device) -> Result<()> {
    let c = ceilings(device, args.runs)?;
    println!(
        "\nceilings: copy {:.0} GB/s, matmul {:.1} TFLOP/s f32, {:.1} TFLOP/s bf16",
        c.bytes_per_s / 1e9,
        c.flops_f32 / 1e12,
        c.flops_bf16 / 1e12
    );
    println!(
        "\n{:<20} {:<8} {:<5} {:>10} {:>14} {:>16} {:>10} {:>8}",
        "kernel", "shape", "dtype", "time", "GB/s (ceil%)", "GFLOP/s (ceil%)", "unfused", "speedup"
    );
    for shape in &SHAPES {
        let inp = inputs(shape, args.tokens, 11)?;
        for dtype in timed_dtypes(device) {
            let p = place(&inp, shape, dtype, device)?;
            let peak = if dtype == DType::BF16 { c.flops_bf16 } else { c.flops_f32 };
            for row in measure(shape, &p, dtype, device, args)? {
                print_row(&row, shape, dtype, &c, peak);
            }
        }
    }
    Ok(())
}

/// One printed line: a fused time against its unfused counterpart, with the
/// bytes and FLOPs that rate it.
struct Row {
    kernel: &'static str,
    fused: Duration,
    unfused: Duration,
    bytes: f64,
    flops: f64,
}

fn print_row(row: &Row, shape: &Shape, dtype: DType, c: &Ceilings, peak: f64) {
    let secs = row.fused.as_secs_f64().max(1e-9);
    let (rate, flops) = (row.bytes / secs, row.flops / secs);
    println!(
        "{:<20} {:<8} {:<5} {:>10} {:>14} {:>16} {:>10} {:>7.2}x",
        row.kernel,
        shape.name,
        dtype_name(dtype),
        micros(row.fused),
        format!("{:.0} ({:.0}%)", rate / 1e9, 100.0 * rate / c.bytes_per_s),
        format!("{:.0} ({:.0}%)", flops / 1e9, 100.0 * flops / peak),
        micros(row.unfused),
        row.unfused.as_secs_f64() / secs
    );
}

fn micros(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// The forward and backward pass, fused and unfused, and the base products
/// they share (subtracted in the "adapter" rows).
fn measure(
    shape: &Shape,
    p: &Placed,
    dtype: DType,
    device: &Device,
    args: &BenchKernelsArgs,
) -> Result<Vec<Row>> {
    let scale = 2.0;
    let runs = args.runs;
    let (t, h, r) = (args.tokens as f64, shape.hidden as f64, shape.rank as f64);
    let (n_rows, n_cols) = (p.sel.n_rows(shape.hidden)? as f64, p.sel.n_cols(shape.hidden)? as f64);
    let e = dtype.size_in_bytes() as f64;

    let base = time(device, runs, || p.x.matmul(&p.w.t()?).map(drop))?;
    let fused = time(device, runs, || forward(&p.x, &p.w, &p.a, &p.b, &p.sel, scale).map(drop))?;
    let unfused = time(device, runs, || unfused_forward(p, scale).map(drop))?;
    let base_g = time(device, runs, || p.g.matmul(&p.w).map(drop))?;
    let fused_b =
        time(device, runs, || backward(&p.x, &p.w, &p.a, &p.b, &p.sel, scale, &p.g).map(drop))?;
    let unfused_b = time(device, runs, || unfused_backward(p, scale).map(drop))?;

    // Least traffic: forward reads x and W and writes y; its adapter reads
    // the selected input columns and reads and writes the selected output
    // columns. The backward pass reads g, W and x and writes dx; its adapter
    // reads the selected columns of g and x and updates those of dx.
    let matmul = 2.0 * t * h * h;
    let adapter_flops = 2.0 * t * r * (n_rows + n_cols);
    let less = |a: Duration, b: Duration| a.saturating_sub(b);
    Ok(vec![
        Row {
            kernel: "forward",
            fused,
            unfused,
            bytes: e * (2.0 * t * h + h * h),
            flops: matmul + adapter_flops,
        },
        Row {
            kernel: "forward adapter",
            fused: less(fused, base),
            unfused: less(unfused, base),
            bytes: e * (t * n_cols + 2.0 * t * n_rows),
            flops: adapter_flops,
        },
        Row {
            kernel: "backward",
            fused: fused_b,
            unfused: unfused_b,
            bytes: e * (3.0 * t * h + h * h),
            flops: matmul + 3.0 * adapter_flops,
        },
        Row {
            kernel: "backward adapter",
            fused: less(fused_b, base_g),
            unfused: less(unfused_b, base_g),
            bytes: e * (t * n_rows + 3.0 * t * n_cols),
            flops: 3.0 * adapter_flops,
        },
    ])
}

/// The composition `ops::lora_linear` falls back to off the CPU, on full-size
/// `A` and `B`: `x W^T + s (x A^T) B^T`.
fn unfused_forward(p: &Placed, scale: f64) -> Result<Tensor> {
    let base = p.x.matmul(&p.w.t()?)?;
    let adapter = p.x.matmul(&p.a_full.t()?)?.matmul(&p.b_full.t()?)?;
    base + (adapter * scale)?
}

/// The backward pass of `ops::lora_linear` as candle ops on full-size `A`
/// and `B`: `dx = g W + s (g B) A`, `dA = s (g B)^T x`, `dB = s g^T (x A^T)`.
fn unfused_backward(p: &Placed, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let gb = p.g.matmul(&p.b_full)?;
    let dx = (p.g.matmul(&p.w)? + (gb.matmul(&p.a_full)? * scale)?)?;
    let da = (gb.t()?.matmul(&p.x)? * scale)?;
    let xa = p.x.matmul(&p.a_full.t()?)?;
    let db = (p.g.t()?.matmul(&xa)? * scale)?;
    Ok((dx, da, db))
}
