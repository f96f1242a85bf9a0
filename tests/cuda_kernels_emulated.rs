//! The CUDA kernels of src/cuda/ run on the CPU and compared with the CPU ops they replace.
//!
//! g++ compiles the .cu sources unchanged against a CPU stand-in for CUDA (tests/cuda_emu/:
//! every GPU thread an OS thread, `__syncthreads` and warp shuffles as barriers). Each test
//! launches a kernel with the grid, block and arguments that src/model/cuda_kernels.rs gives
//! it, and checks the output against the CPU path: `ops::masked_softmax`, `ops::token_nll`,
//! `ops::rope_composed` and `ops::gated_activation`, and their autograd backward; RMSNorm
//! against transformers' own modules (tests/fixtures/hf/rms-norm); AdamW against the CPU
//! optimizer, bit for bit. This is what
//! shows the kernels' indexing, reductions and rounding right on a machine without a GPU; the
//! GPU itself is checked by scripts/gpu-checks.sh (parity of logits and LoRA gradients).
//!
//! The launch geometry below mirrors cuda_kernels.rs: attention one warp per row, 4 rows per
//! block; the loss and RMSNorm one block of 256 threads per row; RoPE and SwiGLU 256 threads
//! per block over all elements.

mod common;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use unlearn::model::config::Activation;
use unlearn::model::launch::{self as plans, Launch, Scalar};
use unlearn::model::ops;
use unlearn::rng::Rng;
use unlearn::train::optim::{kernel_plans, AdamW, AdamWConfig};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

// ---- the emulator ------------------------------------------------------------------------------

/// How the emulator is built: for the value checks, or with ThreadSanitizer, which reports a
/// race between the threads of a block (a missing `__syncthreads` around shared memory, two
/// threads writing one element) that the value checks would pass by luck.
#[derive(Clone, Copy, PartialEq)]
enum Build {
    Plain,
    Tsan,
}
use Build::{Plain, Tsan};

/// The emulator binary of that build, compiled once per test run from
/// tests/cuda_emu/launcher.cpp.
fn emulator(build: Build) -> &'static Path {
    static PLAIN: OnceLock<PathBuf> = OnceLock::new();
    static TSAN: OnceLock<PathBuf> = OnceLock::new();
    let (cell, name, flags): (_, _, &[&str]) = match build {
        Plain => (&PLAIN, "cuda-emu", &["-O2"]),
        Tsan => (&TSAN, "cuda-emu-tsan", &["-O1", "-g", "-fsanitize=thread"]),
    };
    cell.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let out = Command::new("g++")
            .args(["-std=c++20", "-ffp-contract=off", "-pthread", "-Wall"])
            .args(flags)
            .arg("-I")
            .arg(root.join("tests/cuda_emu"))
            .args(["-include", "cuda_emu.h"])
            .arg(root.join("tests/cuda_emu/launcher.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("these tests compile the CUDA kernels for the CPU with g++; install g++");
        assert!(
            out.status.success(),
            "g++ {flags:?} failed on the CUDA kernels (ThreadSanitizer needs libtsan):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

enum Arg {
    In(Vec<u8>),
    /// an output buffer of this many bytes
    Out(usize),
    /// a buffer the kernel updates in place, returned with the outputs
    InOut(Vec<u8>),
    I32(i32),
    I64(i64),
    U64(u64),
    F32(f32),
}

/// Launches `kernel` on the emulator with grid (grid, 1, 1) and block (block.0, block.1, 1);
/// returns the output and in-place buffers in argument order.
fn launch(
    build: Build,
    kernel: &str,
    grid: usize,
    block: (u32, u32),
    args: &[Arg],
) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(emulator(build));
    cmd.arg(kernel)
        .arg(grid.to_string())
        .arg(block.0.to_string())
        .arg(block.1.to_string());
    let mut outputs = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let path = dir.path().join(format!("arg{i}"));
        cmd.arg(match arg {
            Arg::In(bytes) => {
                std::fs::write(&path, bytes).unwrap();
                format!("in:{}", path.display())
            }
            Arg::Out(n) => {
                outputs.push(path.clone());
                format!("out:{}:{n}", path.display())
            }
            Arg::InOut(bytes) => {
                std::fs::write(&path, bytes).unwrap();
                outputs.push(path.clone());
                format!("inout:{}", path.display())
            }
            Arg::I32(v) => format!("i32:{v}"),
            Arg::I64(v) => format!("i64:{v}"),
            Arg::U64(v) => format!("u64:{v}"),
            Arg::F32(v) => format!("f32:{v}"),
        });
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{kernel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    outputs.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Runs `kernel` on the emulator as `plan` lays it out (unlearn::model::launch, the plans
/// cuda_kernels.rs launches with, so their grids, blocks and scalars are the ones tested here):
/// `inputs`, an output of `plan.out_len` elements of `out_dtype`, then the plan's scalars,
/// whose C types the emulator checks against the kernel's signature. Returns the output.
fn run_plan(
    build: Build,
    kernel: &str,
    plan: &Launch,
    inputs: Vec<Arg>,
    out_dtype: DType,
) -> Vec<f32> {
    let mut args = inputs;
    args.push(Arg::Out(plan.out_len * out_dtype.size_in_bytes()));
    args.extend(plan.scalars.iter().map(|s| match *s {
        Scalar::I32(v) => Arg::I32(v),
        Scalar::I64(v) => Arg::I64(v),
        Scalar::Usize(v) => Arg::U64(v as u64),
        Scalar::F32(v) => Arg::F32(v),
    }));
    let out = launch(build, kernel, plan.grid as usize, plan.block, &args);
    values(&out[0], out_dtype)
}

// ---- tensors as the kernels see them -----------------------------------------------------------

fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => panic!("no kernel for {other:?}"),
    }
}

/// The tensor's elements in row-major order, as the device buffer would hold them
/// (little-endian, as candle writes them).
fn bytes(t: &Tensor) -> Arg {
    let mut buffer = Vec::with_capacity(t.elem_count() * t.dtype().size_in_bytes());
    t.write_bytes(&mut buffer).unwrap();
    Arg::In(buffer)
}

/// A kernel's output buffer as f32 values.
fn values(raw: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::BF16 => raw
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        DType::F16 => raw
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        other => panic!("no values for {other:?}"),
    }
}

use common::to_f32_vec as to_f32;

/// `v` rounded to `dtype` (nearest even), as f32.
fn round_to(v: f64, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => v as f32,
        DType::BF16 => bf16::from_f64(v).to_f32(),
        DType::F16 => f16::from_f64(v).to_f32(),
        other => panic!("no rounding to {other:?}"),
    }
}

fn uniform(rng: &mut Rng, dims: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.uniform(lo, hi) as f32).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Units in the last place of `dtype` at `v` (the normal spacing below the smallest normal).
fn ulp(v: f32, dtype: DType) -> f32 {
    let (mantissa_bits, min_normal) = match dtype {
        DType::F32 => (23, f32::MIN_POSITIVE),
        DType::BF16 => (7, f32::MIN_POSITIVE),
        DType::F16 => (10, 6.103_515_6e-5),
        other => panic!("no ulp for {other:?}"),
    };
    let v = v.abs().max(min_normal);
    2f32.powi(v.log2().floor() as i32 - mantissa_bits)
}

/// Every element within `ulps` units in the last place of `dtype` (at the reference value) plus
/// `abs`; NaN only where the reference is NaN; in half types, at most 1% not equal.
fn assert_close(what: &str, got: &[f32], want: &[f32], dtype: DType, ulps: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || g.is_nan() {
            assert!(w.is_nan() && g.is_nan(), "{what}[{i}]: got {g}, want {w}");
            continue;
        }
        if g == w {
            continue;
        }
        let err = (g - w).abs() / (ulps * ulp(w, dtype) + abs);
        if err > worst.0 {
            worst = (err, i);
        }
    }
    // in a half type both sides round the same f32 value, so they differ only at a rounding
    // boundary (the exps differ by an ulp of f32): a step rounded where PyTorch does not round
    // would show in far more elements
    if dtype != DType::F32 {
        let inexact = got
            .iter()
            .zip(want)
            .filter(|(g, w)| g != w && !g.is_nan())
            .count();
        assert!(
            inexact * 100 <= got.len(),
            "{what}: {inexact} of {} elements differ from the reference",
            got.len()
        );
    }
    let i = worst.1;
    assert!(
        worst.0 <= 1.0,
        "{what}[{i}]: got {}, want {} ({:.2}× the tolerance)",
        got[i],
        want[i],
        worst.0
    );
}

// ---- attention softmax -------------------------------------------------------------------------

/// An additive mask [B, 1, T, C] as the decoder builds it: causal over C = past + T keys, batch
/// row b left-padded by b·(past + 1) keys, so that its first b queries see no key (fully masked
/// rows, uniform after the softmax).
fn attention_mask(b: usize, t: usize, c: usize, dtype: DType) -> Tensor {
    let masked = if dtype == DType::F16 { -32768.0 } else { -1e9 };
    let past = c - t;
    let mut data = vec![0f32; b * t * c];
    for bi in 0..b {
        for qi in 0..t {
            for j in 0..c {
                if j > past + qi || j < bi * (past + 1) {
                    data[(bi * t + qi) * c + j] = masked;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, 1, t, c), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The attention kernel `root` over scores [B, H, T, C] (inputs: scores, mask, then any more),
/// the scores multiplied by `scale` first.
fn attention_kernel(build: Build, root: &str, inputs: &[&Tensor], scale: f32) -> Vec<f32> {
    let dtype = inputs[0].dtype();
    let plan = plans::attention(inputs[0].dims(), inputs[1].dims(), scale).unwrap();
    let args = inputs.iter().map(|x| bytes(x)).collect();
    run_plan(
        build,
        &format!("{root}_{}", suffix(dtype)),
        &plan,
        args,
        dtype,
    )
}

/// [B, H, T, C] shapes: C under a warp, over a warp and not a multiple of it, keys from a cache
/// (C > T), and B·H·T rows that do not fill the last block.
const ATTENTION_SHAPES: [[usize; 4]; 3] = [[2, 3, 5, 37], [3, 2, 7, 7], [2, 1, 3, 70]];

/// 1/√d scales: a power of two (d = 64), and one that rounds (d = 37).
const SCALES: [f64; 2] = [0.125, 0.164_398_987_305_357_2];

#[test]
fn masked_softmax_kernel_matches_the_cpu_path() {
    let mut rng = Rng::new(1);
    for dtype in DTYPES {
        for ([b, h, t, c], &scale) in ATTENTION_SHAPES.into_iter().zip(SCALES.iter().cycle()) {
            let scores = uniform(&mut rng, &[b, h, t, c], -40.0, 40.0, dtype);
            let mask = attention_mask(b, t, c, dtype);
            let got = attention_kernel(Plain, "masked_softmax", &[&scores, &mask], scale as f32);
            let want = to_f32(&ops::masked_softmax(&scores, scale, &mask).unwrap());
            let what = format!("masked_softmax {dtype:?} {:?} × {scale}", [b, h, t, c]);
            // f32: summation order and expf; half types: a rounding boundary at most
            let ulps = if dtype == DType::F32 { 8.0 } else { 1.0 };
            assert_close(&what, &got, &want, dtype, ulps, 1e-12);
            // batch row 1's first query sees no key: uniform, as eager attention gives it
            let row = &got[(h * t) * c..(h * t + 1) * c];
            assert!(
                row.iter().all(|&p| p == row[0]),
                "{what}: masked row {row:?}"
            );
        }
    }
}

#[test]
fn masked_softmax_backward_kernel_matches_autograd() {
    let mut rng = Rng::new(2);
    for ([b, h, t, c], &scale) in ATTENTION_SHAPES.into_iter().zip(SCALES.iter().cycle()) {
        // f32 against candle's autograd through the CPU path
        let scores = uniform(&mut rng, &[b, h, t, c], -40.0, 40.0, DType::F32);
        let grad = uniform(&mut rng, &[b, h, t, c], -1.0, 1.0, DType::F32);
        let mask = attention_mask(b, t, c, DType::F32);
        let var = Var::from_tensor(&scores).unwrap();
        let probs = ops::masked_softmax(var.as_tensor(), scale, &mask).unwrap();
        let loss = (probs * &grad).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let want = to_f32(grads.get(var.as_tensor()).unwrap());
        let inputs = [&scores, &mask, &grad];
        let got = attention_kernel(Plain, "masked_softmax_bwd", &inputs, scale as f32);
        let what = format!("masked_softmax_bwd F32 {:?} × {scale}", [b, h, t, c]);
        // g − Σ g⊙p cancels: either side's f32 error is about ε·|g| absolute
        assert_close(&what, &got, &want, DType::F32, 16.0, 2e-7);

        // half types against round(round(p ⊙ (g − Σ g⊙p)) · scale) in f64 from the rounded
        // inputs, with x = round(round(scores · scale) + mask) as PyTorch rounds each op
        for dtype in [DType::BF16, DType::F16] {
            let scores = scores.to_dtype(dtype).unwrap();
            let grad = grad.to_dtype(dtype).unwrap();
            let mask = attention_mask(b, t, c, dtype);
            let scaled: Vec<f32> = to_f32(&scores)
                .iter()
                .map(|&s| round_to((s * scale as f32) as f64, dtype))
                .collect();
            let scaled = Tensor::from_vec(scaled, (b, h, t, c), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let x = to_f32(&scaled.broadcast_add(&mask).unwrap());
            let g = to_f32(&grad);
            let mut want = vec![0f32; x.len()];
            for (r, (xr, gr)) in x.chunks(c).zip(g.chunks(c)).enumerate() {
                let mx = xr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let e: Vec<f64> = xr.iter().map(|&v| (v as f64 - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                let dot: f64 = e.iter().zip(gr).map(|(e, &g)| e / sum * g as f64).sum();
                for j in 0..c {
                    let d_scaled = round_to(e[j] / sum * (gr[j] as f64 - dot), dtype);
                    want[r * c + j] = round_to((d_scaled * scale as f32) as f64, dtype);
                }
            }
            let inputs = [&scores, &mask, &grad];
            let got = attention_kernel(Plain, "masked_softmax_bwd", &inputs, scale as f32);
            let what = format!("masked_softmax_bwd {dtype:?} {:?} × {scale}", [b, h, t, c]);
            // g − dot cancels: the kernel's f32 dot is good to ~1e-7 absolute, times the scale
            assert_close(&what, &got, &want, dtype, 1.0, 1e-6);
        }
    }
}

// ---- next-token loss ---------------------------------------------------------------------------

/// Logits [6, V] and labels that cover: ordinary rows, an ignored row (−100), a label ≥ V (the
/// kernel ignores it), a row with −inf logits (a masked vocabulary), and a row whose first
/// logit is NaN (the first value a thread reads; the loss must be NaN).
fn nll_case(rng: &mut Rng, v: usize, dtype: DType) -> (Tensor, Vec<i64>) {
    let n = 6;
    let mut x: Vec<f32> = (0..n * v).map(|_| rng.uniform(-8.0, 8.0) as f32).collect();
    for j in (0..v).step_by(3) {
        x[3 * v + j] = f32::NEG_INFINITY;
    }
    x[5 * v] = f32::NAN;
    let labels = vec![1, (v - 1) as i64, -100, 4, v as i64, 7];
    let logits = Tensor::from_vec(x, (n, v), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (logits, labels)
}

/// The labels the CPU's `token_nll` takes: the kernel's ignored rows (< 0 or ≥ V) as −100.
fn cpu_labels(labels: &[i64], v: usize) -> Tensor {
    let l: Vec<i64> = labels
        .iter()
        .map(|&l| if l >= v as i64 { -100 } else { l })
        .collect();
    Tensor::new(l, &Device::Cpu).unwrap()
}

#[test]
fn nll_kernels_match_the_cpu_loss_and_its_gradient() {
    let mut rng = Rng::new(3);
    // a vocabulary under the block's 256 threads, and one over it that no thread count divides
    for v in [100, 1000] {
        for dtype in DTYPES {
            let (logits, labels) = nll_case(&mut rng, v, dtype);
            let n = labels.len();
            let label_buffer = || bytes(&Tensor::new(labels.clone(), &Device::Cpu).unwrap());
            let name = |root: &str| format!("{root}_{}", suffix(dtype));
            let what = format!("{dtype:?} V={v}");

            // forward: f32 NLL per row, 0 where ignored
            let plan = plans::nll(n, v, false).unwrap();
            let args = vec![bytes(&logits), label_buffer()];
            let got = run_plan(Plain, &name("nll_fwd"), &plan, args, DType::F32);
            let logits_f32 = logits.to_dtype(DType::F32).unwrap();
            let (nll, _) = ops::token_nll(&logits_f32, &cpu_labels(&labels, v)).unwrap();
            let want = to_f32(&nll);
            assert!(got[5].is_nan(), "{what}: a NaN logit read first was lost");
            assert_close(
                &format!("nll_fwd {what}"),
                &got,
                &want,
                DType::F32,
                8.0,
                1e-6,
            );

            // backward: g·(softmax − onehot) per row, zeros where ignored or g = 0 (row 4)
            let upstream = [0.5f32, -1.0, 2.0, 0.25, 3.0, 1.0];
            let plan = plans::nll(n, v, true).unwrap();
            let upstream_buffer = bytes(&Tensor::new(&upstream[..], &Device::Cpu).unwrap());
            let args = vec![bytes(&logits), label_buffer(), upstream_buffer];
            let got = run_plan(Plain, &name("nll_bwd"), &plan, args, dtype);
            let var = Var::from_tensor(&logits_f32).unwrap();
            let (nll, _) = ops::token_nll(var.as_tensor(), &cpu_labels(&labels, v)).unwrap();
            let g = Tensor::new(&upstream[..], &Device::Cpu).unwrap();
            let grads = (nll * g).unwrap().sum_all().unwrap().backward().unwrap();
            let want: Vec<f32> = to_f32(grads.get(var.as_tensor()).unwrap())
                .iter()
                .map(|&d| round_to(d as f64, dtype))
                .collect();
            // f32: exp(x − lse) of an argument good to an ulp of |x − lse| ≤ 16, on both sides;
            // softmax − 1 at the label cancels to about ε·|g|
            let ulps = if dtype == DType::F32 { 32.0 } else { 1.0 };
            assert_close(&format!("nll_bwd {what}"), &got, &want, dtype, ulps, 4e-7);
        }
    }
}

// ---- RoPE --------------------------------------------------------------------------------------

/// The rope kernel over x [B, H, T, D] with tables [B, 1, T, half]; `grid` blocks (the launch
/// gives one thread per element; fewer blocks exercise the grid-stride loop).
fn rope_kernel(
    build: Build,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    grid: Option<usize>,
) -> Vec<f32> {
    let mut plan = plans::rope(x.dims(), cos.dims(), sin.dims()).unwrap();
    if let Some(grid) = grid {
        plan.grid = grid as u32;
    }
    let args = vec![bytes(x), bytes(cos), bytes(sin)];
    run_plan(
        build,
        &format!("rope_{}", suffix(x.dtype())),
        &plan,
        args,
        x.dtype(),
    )
}

/// Tables for positions that differ per batch row (left padding shifts them).
fn rope_tables(b: usize, t: usize, half: usize, dtype: DType) -> (Tensor, Tensor) {
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for bi in 0..b {
        for ti in 0..t {
            let pos = (ti + 3 * bi) as f64;
            for k in 0..half {
                let angle = pos / 10000f64.powf(2.0 * k as f64 / (2 * half) as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let table = |v| {
        Tensor::from_vec(v, (b, 1, t, half), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    (table(cos), table(sin))
}

/// [B, H, T, D, half]: full rotation, and partial (2·half < D, as GPT-NeoX and Phi rotate).
const ROPE_SHAPES: [[usize; 5]; 2] = [[1, 2, 4, 8, 4], [2, 3, 5, 10, 3]];

#[test]
fn rope_kernel_equals_the_composed_form_bit_for_bit() {
    let mut rng = Rng::new(4);
    for dtype in DTYPES {
        for [b, h, t, d, half] in ROPE_SHAPES {
            let x = uniform(&mut rng, &[b, h, t, d], -3.0, 3.0, dtype);
            let (cos, sin) = rope_tables(b, t, half, dtype);
            let want = to_f32(&ops::rope_composed(&x, &cos, &sin).unwrap());
            let what = format!("rope {dtype:?} {:?}", [b, h, t, d, half]);
            assert_close(
                &what,
                &rope_kernel(Plain, &x, &cos, &sin, None),
                &want,
                dtype,
                0.0,
                0.0,
            );
            let strided = rope_kernel(Plain, &x, &cos, &sin, Some(1));
            assert_close(
                &format!("{what}, one block"),
                &strided,
                &want,
                dtype,
                0.0,
                0.0,
            );
        }
    }
}

#[test]
fn rope_kernel_with_sin_negated_is_the_backward() {
    let mut rng = Rng::new(5);
    for dtype in DTYPES {
        for [b, h, t, d, half] in ROPE_SHAPES {
            let x = uniform(&mut rng, &[b, h, t, d], -3.0, 3.0, dtype);
            let grad = uniform(&mut rng, &[b, h, t, d], -1.0, 1.0, dtype);
            let (cos, sin) = rope_tables(b, t, half, dtype);
            let var = Var::from_tensor(&x).unwrap();
            let y = ops::rope_composed(var.as_tensor(), &cos, &sin).unwrap();
            let grads = (y * &grad).unwrap().sum_all().unwrap().backward().unwrap();
            let want = to_f32(grads.get(var.as_tensor()).unwrap());
            let got = rope_kernel(Plain, &grad, &cos, &sin.neg().unwrap(), None);
            let what = format!("rope backward {dtype:?} {:?}", [b, h, t, d, half]);
            assert_close(&what, &got, &want, dtype, 0.0, 0.0);
        }
    }
}

// ---- SwiGLU ------------------------------------------------------------------------------------

/// An element-wise kernel of `root` (its form for the inputs' dtype) over `inputs`, as `plan`
/// launches it; the output has the inputs' dtype.
fn elementwise_kernel(build: Build, root: &str, plan: &Launch, inputs: &[&Tensor]) -> Vec<f32> {
    let dtype = inputs[0].dtype();
    let args = inputs.iter().map(|x| bytes(x)).collect();
    run_plan(
        build,
        &format!("{root}_{}", suffix(dtype)),
        plan,
        args,
        dtype,
    )
}

fn swiglu_kernel(build: Build, root: &str, inputs: &[&Tensor]) -> Vec<f32> {
    let plan = plans::elementwise(root, inputs[0].elem_count()).unwrap();
    elementwise_kernel(build, root, &plan, inputs)
}

#[test]
fn swiglu_kernels_match_the_cpu_forward_and_autograd() {
    let mut rng = Rng::new(6);
    let dims = [7, 300];
    for dtype in DTYPES {
        let gate = uniform(&mut rng, &dims, -8.0, 8.0, dtype);
        let up = uniform(&mut rng, &dims, -2.0, 2.0, dtype);
        let grad = uniform(&mut rng, &dims, -1.0, 1.0, dtype);
        let what = |op: &str| format!("{op} {dtype:?}");
        let got_fwd = swiglu_kernel(Plain, "swiglu", &[&gate, &up]);
        let got_gate = swiglu_kernel(Plain, "swiglu_gate_grad", &[&gate, &up, &grad]);
        let got_up = swiglu_kernel(Plain, "swiglu_up_grad", &[&gate, &grad]);
        if dtype == DType::F32 {
            // candle's autograd through the CPU path (the fused op, exp within 2 ulp of libm)
            let (g_var, u_var) = (
                Var::from_tensor(&gate).unwrap(),
                Var::from_tensor(&up).unwrap(),
            );
            let y = ops::gated_activation(g_var.as_tensor(), u_var.as_tensor(), Activation::Silu)
                .unwrap();
            let grads = (&y * &grad).unwrap().sum_all().unwrap().backward().unwrap();
            // 1 + g·(1 − σ(g)) cancels near g = −1.28: an absolute floor of ε·|∂y·up|
            let check = |op: &str, got: &[f32], want: &Tensor| {
                assert_close(&what(op), got, &to_f32(want), dtype, 8.0, 2e-7)
            };
            check("swiglu", &got_fwd, &y);
            check(
                "swiglu_gate_grad",
                &got_gate,
                grads.get(g_var.as_tensor()).unwrap(),
            );
            check(
                "swiglu_up_grad",
                &got_up,
                grads.get(u_var.as_tensor()).unwrap(),
            );
        } else {
            // PyTorch's eager rounding (src/cuda/swiglu.cu), in f64 from the rounded inputs
            let (g, u, dy) = (to_f32(&gate), to_f32(&up), to_f32(&grad));
            let (mut fwd, mut d_gate, mut d_up) = (vec![], vec![], vec![]);
            for i in 0..g.len() {
                let (gi, ui, dyi) = (g[i] as f64, u[i] as f64, dy[i] as f64);
                let s = 1.0 / (1.0 + (-gi).exp());
                let act = round_to(gi * s, dtype) as f64;
                fwd.push(round_to(act * ui, dtype));
                let d_act = round_to(dyi * ui, dtype) as f64;
                d_gate.push(round_to(d_act * s * (1.0 + gi * (1.0 - s)), dtype));
                d_up.push(round_to(dyi * act, dtype));
            }
            // a rounding boundary in silu(gate) moves the product by one more ulp
            assert_close(&what("swiglu"), &got_fwd, &fwd, dtype, 2.0, 0.0);
            assert_close(
                &what("swiglu_gate_grad"),
                &got_gate,
                &d_gate,
                dtype,
                1.0,
                0.0,
            );
            assert_close(&what("swiglu_up_grad"), &got_up, &d_up, dtype, 2.0, 0.0);
        }
    }
}

// ---- soft cap ----------------------------------------------------------------------------------

fn softcap_kernel(build: Build, root: &str, inputs: &[&Tensor], cap: f32) -> Vec<f32> {
    let plan = plans::softcap(inputs[0].elem_count(), cap).unwrap();
    elementwise_kernel(build, root, &plan, inputs)
}

/// softcap.cu against candle's autograd through the composed ops on the CPU (a division, tanh
/// and a product, each rounded in the dtype as transformers rounds them), in every dtype: the
/// values and the gradient, with x spread over the cap's linear and saturated ranges.
#[test]
fn softcap_kernels_match_the_composed_cpu_forward_and_autograd() {
    let mut rng = Rng::new(8);
    let cap = 30.0;
    for dtype in DTYPES {
        let x = uniform(&mut rng, &[9, 301], -120.0, 120.0, dtype);
        let grad = uniform(&mut rng, &[9, 301], -1.0, 1.0, dtype);
        let var = Var::from_tensor(&x).unwrap();
        let y = ops::composed_softcap(var.as_tensor(), cap as f64).unwrap();
        let grads = (&y * &grad).unwrap().sum_all().unwrap().backward().unwrap();
        let what = |op: &str| format!("{op} {dtype:?}");
        let got = softcap_kernel(Plain, "softcap", &[&x], cap);
        // the host's tanhf against Rust's tanh: an ulp of f32 apart at most, so equal after
        // rounding to a half type but at a boundary
        assert_close(&what("softcap"), &got, &to_f32(&y), dtype, 2.0, 0.0);
        let got = softcap_kernel(Plain, "softcap_grad", &[&x, &grad], cap);
        let want = to_f32(grads.get(var.as_tensor()).unwrap());
        // t·t − 1 cancels near t = ±1 (saturation): an absolute floor of an ulp at 1 × |g|
        assert_close(
            &what("softcap_grad"),
            &got,
            &want,
            dtype,
            4.0,
            2.0 * ulp(1.0, dtype),
        );
    }
}

/// Phi-3's packed [gate | up] rows: the packed kernels equal the separate ones on the halves
/// to the last bit (the same device functions), for rows of an odd width.
#[test]
fn packed_swiglu_kernels_equal_the_separate_kernels() {
    let mut rng = Rng::new(7);
    let (rows, inter) = (5, 301);
    for dtype in DTYPES {
        let y = uniform(&mut rng, &[rows, 2 * inter], -8.0, 8.0, dtype);
        let grad = uniform(&mut rng, &[rows, inter], -1.0, 1.0, dtype);
        let gate = y.narrow(1, 0, inter).unwrap().contiguous().unwrap();
        let up = y.narrow(1, inter, inter).unwrap().contiguous().unwrap();
        let packed = |root: &str, inputs: &[&Tensor]| {
            let grad = inputs.get(1).map(|g| g.dims());
            let plan = plans::swiglu_packed(inputs[0].dims(), grad, inter).unwrap();
            let args = inputs.iter().map(|t| bytes(t)).collect();
            run_plan(
                Plain,
                &format!("{root}_{}", suffix(dtype)),
                &plan,
                args,
                dtype,
            )
        };
        let what = |op: &str| format!("{op} {dtype:?}");
        let fwd = packed("swiglu_packed", &[&y]);
        let want = swiglu_kernel(Plain, "swiglu", &[&gate, &up]);
        assert_close(&what("swiglu_packed"), &fwd, &want, dtype, 0.0, 0.0);

        let dy = packed("swiglu_packed_bwd", &[&y, &grad]);
        let d_gate = swiglu_kernel(Plain, "swiglu_gate_grad", &[&gate, &up, &grad]);
        let d_up = swiglu_kernel(Plain, "swiglu_up_grad", &[&gate, &grad]);
        let want: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let row = r * inter..(r + 1) * inter;
                d_gate[row.clone()]
                    .iter()
                    .chain(&d_up[row])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_close(&what("swiglu_packed_bwd"), &dy, &want, dtype, 0.0, 0.0);
    }
}

// ---- RMSNorm -----------------------------------------------------------------------------------

/// The RMSNorm kernel `root` over rows of x [.., d] (inputs: x, w, then the gradient for the
/// backward).
fn rms_norm_kernel(build: Build, root: &str, inputs: &[&Tensor], plus_one: bool) -> Vec<f32> {
    let (x, w) = (inputs[0], inputs[1]);
    let grad = inputs.get(2).map(|g| g.dims());
    let plan = plans::rms_norm(x.dims(), w.dims(), grad, 1e-6, plus_one).unwrap();
    let args = inputs.iter().map(|t| bytes(t)).collect();
    run_plan(
        build,
        &format!("{root}_{}", suffix(x.dtype())),
        &plan,
        args,
        x.dtype(),
    )
}

#[test]
fn rms_norm_kernels_match_transformers() {
    let r = common::reference("rms-norm");
    // under a warp, several warps, more than one pass of the block, a model's hidden size; the
    // first row zeros and the second at 1e-3, where ε decides the result
    for d in [7, 96, 1000, 4096] {
        for dtype in DTYPES {
            let key = format!("d{d}_{}", suffix(dtype));
            let (x, g) = (&r[&format!("x_{key}")], &r[&format!("g_{key}")]);
            for (family, weight, plus_one) in
                [("llama", "w", false), ("gemma2", "w_plus_one", true)]
            {
                let w = &r[&format!("{weight}_{key}")];
                let what = |op: &str| format!("{op} {family} {key}");
                let y = rms_norm_kernel(Plain, "rms_norm", &[x, w], plus_one);
                let dx = rms_norm_kernel(Plain, "rms_norm_bwd", &[x, w, g], plus_one);
                let want_y = to_f32(&r[&format!("{family}_y_{key}")]);
                let want_dx = to_f32(&r[&format!("{family}_dx_{key}")]);
                // f32: torch's rsqrt and summation order, and in the 1e-3 row the backward's
                // r·u − r³·x·Σ(u⊙x)/d cancels terms 450 times |u| over up to 4096 products (a
                // misplaced ε is off by far more in the zero row); half types: torch's roundings
                let f32_ = dtype == DType::F32;
                let (ulps, abs) = if f32_ { (8.0, 1e-6) } else { (1.0, 0.0) };
                assert_close(&what("rms_norm"), &y, &want_y, dtype, ulps, abs);
                let (ulps, abs) = if f32_ { (64.0, 1e-5) } else { (1.0, 0.0) };
                assert_close(&what("rms_norm_bwd"), &dx, &want_dx, dtype, ulps, abs);
            }
        }
    }
}

// ---- AdamW -------------------------------------------------------------------------------------

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One optimizer step on the emulator, adamw.cu's two kernels in place as
/// `unlearn::train::optim::kernel_plans` launches them: the moments [2, n] with the gradient,
/// then the parameter with the moments.
#[allow(clippy::too_many_arguments)]
fn adamw_kernels(
    build: Build,
    cfg: &AdamWConfig,
    step: usize,
    lr: f64,
    grad_scale: f64,
    param: &mut Vec<f32>,
    moments: &mut Vec<f32>,
    grad: &[f32],
) {
    let (moments_plan, param_plan) = kernel_plans(cfg, step, lr, grad_scale, param.len()).unwrap();
    let scalars = |plan: &Launch| -> Vec<Arg> {
        let arg = |s: &Scalar| match *s {
            Scalar::Usize(v) => Arg::U64(v as u64),
            Scalar::F32(v) => Arg::F32(v),
            other => panic!("adamw takes no {other:?}"),
        };
        plan.scalars.iter().map(arg).collect()
    };
    let mut args = vec![Arg::InOut(f32_bytes(moments)), Arg::In(f32_bytes(grad))];
    args.extend(scalars(&moments_plan));
    let grid = moments_plan.grid as usize;
    let out = launch(build, "adamw_moments_f32", grid, moments_plan.block, &args);
    *moments = values(&out[0], DType::F32);
    let mut args = vec![Arg::InOut(f32_bytes(param)), Arg::In(f32_bytes(moments))];
    args.extend(scalars(&param_plan));
    let grid = param_plan.grid as usize;
    let out = launch(build, "adamw_param_f32", grid, param_plan.block, &args);
    *param = values(&out[0], DType::F32);
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// adamw.cu against the CPU optimizer (src/train/optim.rs, itself checked against torch): four
/// steps on torch's fixture (tests/fixtures/hf/adamw), with weight decay and without, through
/// both branches of torch's lerp, one step with a clipped gradient. Moments and parameter equal
/// the CPU's bit for bit after every step, so a run takes the same steps on either device.
#[test]
fn adamw_kernels_equal_the_cpu_step_bit_for_bit() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/adamw/reference.safetensors");
    let r = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let lrs = [1e-3, 5e-4, 2e-3, 1e-4];
    let grad_scales = [1.0, 0.37, 1.0, 1.0];
    for (key, beta1, beta2, eps, weight_decay) in [
        ("a", 0.9, 0.999, 1e-8, 0.01),
        ("b", 0.9, 0.999, 1e-8, 0.0),
        ("c", 0.3, 0.95, 1e-6, 0.1),
    ] {
        let cfg = AdamWConfig {
            lr: lrs[0],
            beta1,
            beta2,
            eps,
            weight_decay,
        };
        let p0 = r[&format!("{key}.p0")].copy().unwrap();
        let var = Var::from_tensor(&p0).unwrap();
        let mut cpu = AdamW::new(cfg, std::slice::from_ref(&var)).unwrap();
        let mut param = to_f32(&p0);
        let mut moments = vec![0f32; 2 * param.len()];
        for (step, (lr, grad_scale)) in (1..).zip(lrs.into_iter().zip(grad_scales)) {
            let g = &r[&format!("{key}.g{step}")];
            cpu.step_scaled(
                std::slice::from_ref(&var),
                std::slice::from_ref(g),
                grad_scale,
                lr,
            )
            .unwrap();
            adamw_kernels(
                Plain,
                &cfg,
                step,
                lr,
                grad_scale,
                &mut param,
                &mut moments,
                &to_f32(g),
            );
            let n = param.len();
            let cpu_m = to_f32(&cpu.exp_avg(0).unwrap());
            let cpu_v = to_f32(&cpu.exp_avg_sq(0).unwrap());
            assert!(
                same_bits(&moments[..n], &cpu_m),
                "{key} step {step}: exp_avg"
            );
            assert!(
                same_bits(&moments[n..], &cpu_v),
                "{key} step {step}: exp_avg_sq"
            );
            assert!(
                same_bits(&param, &to_f32(var.as_tensor())),
                "{key} step {step}: param"
            );
        }
    }
}

// ---- races -------------------------------------------------------------------------------------

/// Every kernel once under ThreadSanitizer, at shapes that take several warps and several
/// passes of the block (the value tests above run the same launches uninstrumented). A race
/// fails the launch with TSAN's report: it catches the backward RMSNorm's second block sum
/// racing the first's read when the barrier between them is removed, which the value checks
/// pass.
#[test]
fn kernels_have_no_data_races() {
    let mut rng = Rng::new(8);
    let f32_ = DType::F32;

    let scores = uniform(&mut rng, &[1, 2, 3, 40], -6.0, 6.0, f32_);
    let mask = attention_mask(1, 3, 40, f32_);
    let grad = uniform(&mut rng, &[1, 2, 3, 40], -1.0, 1.0, f32_);
    attention_kernel(Tsan, "masked_softmax", &[&scores, &mask], 0.125);
    attention_kernel(Tsan, "masked_softmax_bwd", &[&scores, &mask, &grad], 0.125);

    let (logits, labels) = nll_case(&mut rng, 600, f32_);
    let n = labels.len();
    let labels = || bytes(&Tensor::new(labels.clone(), &Device::Cpu).unwrap());
    let plan = plans::nll(n, 600, false).unwrap();
    run_plan(
        Tsan,
        "nll_fwd_f32",
        &plan,
        vec![bytes(&logits), labels()],
        f32_,
    );
    let upstream =
        bytes(&Tensor::new(&[1f32, -1.0, 2.0, 0.5, 3.0, 0.0][..], &Device::Cpu).unwrap());
    let plan = plans::nll(n, 600, true).unwrap();
    let args = vec![bytes(&logits), labels(), upstream];
    run_plan(Tsan, "nll_bwd_f32", &plan, args, f32_);

    let x = uniform(&mut rng, &[2, 600], -2.0, 2.0, f32_);
    let w = uniform(&mut rng, &[600], 0.5, 1.5, f32_);
    let g = uniform(&mut rng, &[2, 600], -1.0, 1.0, f32_);
    rms_norm_kernel(Tsan, "rms_norm", &[&x, &w], false);
    rms_norm_kernel(Tsan, "rms_norm_bwd", &[&x, &w, &g], false);

    let x = uniform(&mut rng, &[1, 2, 3, 10], -3.0, 3.0, f32_);
    let (cos, sin) = rope_tables(1, 3, 3, f32_);
    rope_kernel(Tsan, &x, &cos, &sin, Some(1));

    let gate = uniform(&mut rng, &[3, 100], -8.0, 8.0, f32_);
    let up = uniform(&mut rng, &[3, 100], -2.0, 2.0, f32_);
    let dy = uniform(&mut rng, &[3, 100], -1.0, 1.0, f32_);
    swiglu_kernel(Tsan, "swiglu", &[&gate, &up]);
    swiglu_kernel(Tsan, "swiglu_gate_grad", &[&gate, &up, &dy]);
    swiglu_kernel(Tsan, "swiglu_up_grad", &[&gate, &dy]);
    let packed = Tensor::cat(&[&gate, &up], 1).unwrap();
    let plan = plans::swiglu_packed(packed.dims(), None, 100).unwrap();
    run_plan(Tsan, "swiglu_packed_f32", &plan, vec![bytes(&packed)], f32_);
    let plan = plans::swiglu_packed(packed.dims(), Some(dy.dims()), 100).unwrap();
    let args = vec![bytes(&packed), bytes(&dy)];
    run_plan(Tsan, "swiglu_packed_bwd_f32", &plan, args, f32_);
    softcap_kernel(Tsan, "softcap", &[&gate], 30.0);
    softcap_kernel(Tsan, "softcap_grad", &[&gate, &dy], 30.0);

    let cfg = AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut param = to_f32(&uniform(&mut rng, &[700], -0.1, 0.1, f32_));
    let grad = to_f32(&uniform(&mut rng, &[700], -1.0, 1.0, f32_));
    let mut moments = vec![0f32; 1400];
    adamw_kernels(Tsan, &cfg, 1, 1e-3, 1.0, &mut param, &mut moments, &grad);
}
