//! The geometry and scalar arguments of every launch of our CUDA kernels (src/cuda/), computed
//! from shapes alone. `cuda_kernels.rs` launches with them (buffers first, in the kernel's order,
//! then the output, then these scalars), and tests/cuda_kernels_emulated.rs runs the same
//! launches on the CPU, where the emulator checks each scalar's C type against the kernel's
//! signature: the order and types of every argument are tested without a GPU. Compiled in every
//! build; nothing here touches a device.

/// A kernel's scalar parameter, in the C type it is declared with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    /// `int`
    I32(i32),
    /// `int64_t`
    I64(i64),
    /// `size_t`
    Usize(usize),
    /// `float`
    F32(f32),
}

/// One launch: `grid` blocks of `block` threads (x, y), an output of `out_len` elements (0 for
/// the in-place AdamW kernels), and the scalars that follow the buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub grid: u32,
    pub block: (u32, u32),
    pub out_len: usize,
    pub scalars: Vec<Scalar>,
}

/// rows (one warp each) per block of the attention kernels
pub const ROWS_PER_BLOCK: u32 = 4;
/// threads per block of the one-block-per-row kernels (loss, RMSNorm): a multiple of 32, at
/// most 1024 (they keep one partial result per warp in shared arrays of 32)
pub const ROW_THREADS: u32 = 256;
/// threads per block of the grid-stride kernels (RoPE, SwiGLU)
pub const ELEMENTWISE_THREADS: u32 = 256;

/// The longest row a kernel's `int` column loop (`c += step`) walks without overflowing.
const fn max_row(step: u32) -> usize {
    (i32::MAX as u32 - step) as usize
}

const I32_MAX: usize = i32::MAX as usize;

/// A grid-stride kernel over `n` elements: a thread each, the grid capped at 2³¹ − 1 blocks.
fn grid_stride(n: usize, out_len: usize, scalars: Vec<Scalar>) -> Launch {
    Launch {
        grid: n.div_ceil(ELEMENTWISE_THREADS as usize).min(I32_MAX) as u32,
        block: (ELEMENTWISE_THREADS, 1),
        out_len,
        scalars,
    }
}

/// attention.cu over scores [B, H, T, C] with a mask [B, 1, T, C]: (rows, cols, heads, t_q,
/// scale), one warp per row.
pub fn attention(scores: &[usize], mask: &[usize], scale: f32) -> candle_core::Result<Launch> {
    let &[b, h, t, c] = scores else {
        candle_core::bail!("masked-softmax: scores {scores:?} are not [B, H, T, C]");
    };
    if mask != [b, 1, t, c] {
        candle_core::bail!("masked-softmax: mask {mask:?} for scores {scores:?}");
    }
    let rows = b * h * t;
    if rows == 0 || c == 0 || c > max_row(32) || h * t > I32_MAX || rows > I32_MAX {
        candle_core::bail!("masked-softmax: scores {scores:?} do not fit the kernels");
    }
    use Scalar::{F32, I32, I64};
    Ok(Launch {
        grid: rows.div_ceil(ROWS_PER_BLOCK as usize) as u32,
        block: (32, ROWS_PER_BLOCK),
        out_len: rows * c,
        scalars: vec![
            I64(rows as i64),
            I32(c as i32),
            I32(h as i32),
            I32(t as i32),
            F32(scale),
        ],
    })
}

/// nll.cu over logits [n, v]: (v), one block per row; the output is the n losses forward, the
/// n·v gradient backward.
pub fn nll(n: usize, v: usize, backward: bool) -> candle_core::Result<Launch> {
    // one block per row: the grid's x dimension takes at most 2³¹ − 1 blocks
    if n == 0 || v == 0 || v > max_row(ROW_THREADS) || n > I32_MAX {
        candle_core::bail!("fused-nll: {n} rows of {v} logits do not fit the kernel");
    }
    Ok(Launch {
        grid: n as u32,
        block: (ROW_THREADS, 1),
        out_len: if backward { n * v } else { n },
        scalars: vec![Scalar::I32(v as i32)],
    })
}

/// rms_norm.cu over x [.., d] with the weight [d] (and, backward, the gradient like x):
/// (d, eps, plus_one), one block per row.
pub fn rms_norm(
    x: &[usize],
    w: &[usize],
    grad: Option<&[usize]>,
    eps: f32,
    plus_one: bool,
) -> candle_core::Result<Launch> {
    let n: usize = x.iter().product();
    let d = match w {
        &[d] if x.last() == Some(&d) => d,
        _ => candle_core::bail!("rms-norm: weight {w:?} for x {x:?}"),
    };
    if d == 0 || n == 0 || d > max_row(ROW_THREADS) || n / d > I32_MAX {
        candle_core::bail!("rms-norm: x {x:?} does not fit the kernel");
    }
    if let Some(g) = grad.filter(|g| *g != x) {
        candle_core::bail!("rms-norm: gradient {g:?} for x {x:?}");
    }
    use Scalar::{F32, I32};
    Ok(Launch {
        grid: (n / d) as u32,
        block: (ROW_THREADS, 1),
        out_len: n,
        scalars: vec![I32(d as i32), F32(eps), I32(plus_one as i32)],
    })
}

/// rope.cu over x [B, H, T, D] with tables cos, sin [B, 1, T, half]: (n, d, half, heads, t).
pub fn rope(x: &[usize], cos: &[usize], sin: &[usize]) -> candle_core::Result<Launch> {
    let &[b, h, t, d] = x else {
        candle_core::bail!("fused-rope: x {x:?} is not [B, H, T, D]");
    };
    let half = cos.last().copied().unwrap_or(0);
    if cos != [b, 1, t, half] || sin != cos || 2 * half > d {
        candle_core::bail!("fused-rope: tables {cos:?} / {sin:?} for x {x:?}");
    }
    let n = b * h * t * d;
    if n == 0 || d > I32_MAX || h * t > I32_MAX {
        candle_core::bail!("fused-rope: x {x:?} does not fit the kernel");
    }
    use Scalar::{Usize, I32};
    let scalars = vec![
        Usize(n),
        I32(d as i32),
        I32(half as i32),
        I32(h as i32),
        I32(t as i32),
    ];
    Ok(grid_stride(n, n, scalars))
}

/// The soft-cap kernels of softcap.cu over n elements: (n, cap).
pub fn softcap(n: usize, cap: f32) -> candle_core::Result<Launch> {
    if n == 0 {
        candle_core::bail!("softcap: empty input");
    }
    Ok(grid_stride(n, n, vec![Scalar::Usize(n), Scalar::F32(cap)]))
}

/// The element-wise kernels of swiglu.cu over n elements: (n).
pub fn elementwise(root: &str, n: usize) -> candle_core::Result<Launch> {
    if n == 0 {
        candle_core::bail!("{root}: empty input");
    }
    Ok(grid_stride(n, n, vec![Scalar::Usize(n)]))
}

/// The packed SwiGLU kernels of swiglu.cu over y [.., 2·inter] (and, backward, the gradient
/// [.., inter]): (n, inter) with n = rows · inter; the output is [.., inter] forward, like y
/// backward.
pub fn swiglu_packed(
    y: &[usize],
    grad: Option<&[usize]>,
    inter: usize,
) -> candle_core::Result<Launch> {
    let n = y.iter().product::<usize>() / 2;
    if inter == 0 || y.last() != Some(&(2 * inter)) || n == 0 {
        candle_core::bail!("packed swiglu: y {y:?} is not [.., 2 × {inter}]");
    }
    if let Some(g) = grad {
        if g.split_last() != Some((&inter, &y[..y.len() - 1])) {
            candle_core::bail!("packed swiglu: gradient {g:?} for y {y:?}");
        }
    }
    use Scalar::Usize;
    let out_len = if grad.is_some() { 2 * n } else { n };
    Ok(grid_stride(n, out_len, vec![Usize(n), Usize(inter)]))
}

/// adamw.cu's moment kernel, in place over the moments [2, n] of an f32 variable of n elements
/// with its gradient [n]: (n, grad_scale, lerp_weight, beta2, sq_weight). No output.
pub fn adamw_moments(
    n: usize,
    grad_scale: f32,
    lerp_weight: f32,
    beta2: f32,
    sq_weight: f32,
) -> candle_core::Result<Launch> {
    if n == 0 {
        candle_core::bail!("adamw: empty variable");
    }
    use Scalar::{Usize, F32};
    let scalars = vec![
        Usize(n),
        F32(grad_scale),
        F32(lerp_weight),
        F32(beta2),
        F32(sq_weight),
    ];
    Ok(grid_stride(n, 0, scalars))
}

/// adamw.cu's parameter kernel, in place over an f32 variable of n elements with its updated
/// moments [2, n]: (n, decay, bc2_sqrt, eps, neg_step). No output.
pub fn adamw_param(
    n: usize,
    decay: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step: f32,
) -> candle_core::Result<Launch> {
    if n == 0 {
        candle_core::bail!("adamw: empty variable");
    }
    use Scalar::{Usize, F32};
    let scalars = vec![Usize(n), F32(decay), F32(bc2_sqrt), F32(eps), F32(neg_step)];
    Ok(grid_stride(n, 0, scalars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_shapes_are_errors_that_name_them() {
        let err = attention(&[2, 3, 5, 7], &[2, 1, 5, 8], 1.0).unwrap_err();
        assert!(err.to_string().contains("[2, 1, 5, 8]"), "{err}");
        let err = rms_norm(&[4, 6], &[5], None, 1e-6, false).unwrap_err();
        assert!(err.to_string().contains("weight [5] for x [4, 6]"), "{err}");
        assert!(rms_norm(&[4, 6], &[6], Some(&[4, 5]), 1e-6, false).is_err());
        assert!(rope(&[1, 2, 3, 4], &[1, 1, 3, 3], &[1, 1, 3, 3]).is_err());
        assert!(swiglu_packed(&[3, 10], None, 4).is_err());
        assert!(swiglu_packed(&[3, 10], Some(&[3, 4]), 5).is_err());
        assert!(nll(0, 10, false).is_err());
        assert!(elementwise("swiglu", 0).is_err());
        assert!(adamw_moments(0, 1.0, 0.1, 0.999, 0.001).is_err());
        assert!(adamw_param(0, 1.0, 1.0, 1e-8, -1e-3).is_err());
    }

    #[test]
    fn grids_cover_every_row_and_element() {
        // 30 rows of attention: 8 blocks of 4 warps, the last one half used
        let a = attention(&[2, 3, 5, 37], &[2, 1, 5, 37], 0.125).unwrap();
        assert_eq!((a.grid, a.block, a.out_len), (8, (32, 4), 30 * 37));
        // 1000 elements: 4 blocks of 256 threads
        let e = elementwise("swiglu", 1000).unwrap();
        assert_eq!((e.grid, e.block), (4, (256, 1)));
        let p = swiglu_packed(&[3, 10], Some(&[3, 5]), 5).unwrap();
        assert_eq!(
            (p.out_len, p.scalars.clone()),
            (30, vec![Scalar::Usize(15), Scalar::Usize(5)])
        );
    }
}
