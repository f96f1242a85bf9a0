//! The vendored candle's CPU matmul (vendor/README.md §3) splits a product into blocks that run
//! single-threaded on candle's barrier pool. Each block must give every element the same bits as
//! one unsplit single-threaded gemm call would: the split is then invisible in any result, and
//! results do not depend on the number of threads.
#![cfg(target_arch = "x86_64")]

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, Layout, Tensor, WithDType};
use gemm::Parallelism;

/// xorshift, so the shapes cover the same cases on every run
struct Shapes(u64);

impl Shapes {
    fn below(&mut self, hi: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 as usize) % hi + 1
    }
}

/// A batch of random `rows × cols` matrices: the buffer, the tensor over it (stored as the
/// transpose and viewed back when `transposed`) and the matrices' (column, row) strides.
fn operand<T: WithDType>(
    batch: usize,
    rows: usize,
    cols: usize,
    transposed: bool,
) -> (Vec<T>, Tensor, (usize, usize)) {
    let dev = Device::Cpu;
    let buf: Vec<T> = Tensor::randn(0f32, 1., batch * rows * cols, &dev)
        .unwrap()
        .to_dtype(T::DTYPE)
        .unwrap()
        .to_vec1()
        .unwrap();
    if transposed {
        let stored = Tensor::from_slice(&buf, (batch, cols, rows), &dev).unwrap();
        (buf, stored.transpose(1, 2).unwrap(), (rows, 1))
    } else {
        let t = Tensor::from_slice(&buf, (batch, rows, cols), &dev).unwrap();
        (buf, t, (1, cols))
    }
}

/// Products of random shapes (batches 1–9, tiny to a few hundred per side, k to 1500, both operands
/// transposed or not) through `Tensor::matmul`, against gemm called once per batch, unsplit and
/// single-threaded, on the same buffers with the same strides; returns the failing cases.
fn split_products_differ<T: WithDType>(trials: usize, seed: u64) -> Vec<String> {
    let mut shapes = Shapes(seed);
    let mut failures = vec![];
    for trial in 0..trials {
        let bs = [1, 1, 2, 3, 5, 9][trial % 6];
        let m = shapes.below(if trial % 3 == 0 { 64 } else { 500 });
        // past k = 512 gemm blocks k, by a size its small-matrix path picks otherwise
        let k = shapes.below(match trial % 10 {
            0 | 5 => 16,
            3 => 1500,
            _ => 300,
        });
        let n = shapes.below(if trial % 7 == 0 { 64 } else { 500 });
        let (a_transposed, b_transposed) = ((trial / 6) % 2 == 1, (trial / 12) % 2 == 1);
        let (a_buf, a, (a_cs, a_rs)) = operand::<T>(bs, m, k, a_transposed);
        let (b_buf, b, (b_cs, b_rs)) = operand::<T>(bs, k, n, b_transposed);
        let got: Vec<T> = a
            .matmul(&b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut want = vec![T::from_f64(0.0); bs * m * n];
        for s in 0..bs {
            // SAFETY: the buffers hold bs batches of the given shapes and strides.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    want[s * m * n..].as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a_buf[s * m * k..].as_ptr(),
                    a_cs as isize,
                    a_rs as isize,
                    b_buf[s * n * k..].as_ptr(),
                    b_cs as isize,
                    b_rs as isize,
                    T::from_f64(0.0),
                    T::from_f64(1.0),
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
        let differing = got
            .iter()
            .zip(&want)
            .filter(|(x, y)| x.to_f64().to_bits() != y.to_f64().to_bits())
            .count();
        if differing > 0 {
            failures.push(format!(
                "batch {bs}, m {m}, k {k}, n {n}, lhs transposed {a_transposed}, rhs transposed {b_transposed}: {differing} of {} elements differ",
                got.len()
            ));
        }
    }
    failures
}

#[test]
fn split_matmul_equals_one_single_threaded_gemm_bit_for_bit() {
    let failures = split_products_differ::<f32>(600, 12345);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let failures = split_products_differ::<f64>(120, 999);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn matmul_over_an_empty_inner_dimension_is_zero() {
    // gemm writes zeros for k = 0; the destination is no longer zero-filled before it.
    // `Tensor::matmul` answers k = 0 with zeros itself, so this calls the CPU backend, as the
    // custom ops (src/model/linear.rs) do.
    let (b, m, n) = (3, 70, 90);
    let a = CpuStorage::F32(vec![]);
    let rhs = CpuStorage::F32(vec![]);
    let product = a
        .matmul(
            &rhs,
            (b, m, n, 0),
            &Layout::contiguous((b, m, 0)),
            &Layout::contiguous((b, 0, n)),
        )
        .unwrap();
    let CpuStorage::F32(c) = product else {
        panic!("an f32 product came back as {:?}", product.dtype())
    };
    assert_eq!(c.len(), b * m * n);
    assert!(c.iter().all(|&x| x.to_bits() == 0));
}
