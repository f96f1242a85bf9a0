//! Launches of our own CUDA kernels (src/cuda/*.cu, compiled to PTX by build.rs) for the custom
//! ops of [`crate::model::ops`]. Built with the `cuda` feature only; never reached on the CPU.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaDevice, Layout, WithDType};

/// A kernel's scalar parameter, in the C type it is declared with.
enum Scalar {
    /// `int`
    I32(i32),
    /// `int64_t`
    I64(i64),
    /// `size_t`
    Usize(usize),
    /// `float`
    F32(f32),
}

/// A kernel source: the PTX build.rs compiled, and the module name it is loaded under.
type Module = (&'static str, &'static str);

/// Launches `root` (its `_f32`, `_bf16` or `_f16` form, for T) of `module` with the arguments
/// every kernel here but the loss's takes: the contiguous inputs, a fresh output of `out_len`
/// elements, then `scalars`. Each caller states why its kernel writes all `out_len` elements
/// and that `scalars` follow the kernel's signature.
fn launch<T: DeviceRepr + WithDType>(
    dev: &CudaDevice,
    module: Module,
    root: &str,
    inputs: &[(&CudaSlice<T>, &Layout, &str)],
    out_len: usize,
    scalars: &[Scalar],
    cfg: LaunchConfig,
) -> candle_core::Result<CudaSlice<T>> {
    if out_len == 0 {
        candle_core::bail!("{root}: empty output (the callers reject empty inputs)");
    }
    let views = inputs
        .iter()
        .map(|(src, layout, what)| contiguous_view(src, layout, what))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (ptx, name) = module;
    let func = dev.get_or_load_custom_func(&kernel_name::<T>(root), name, ptx)?;
    // SAFETY: the caller's kernel writes all out_len elements
    let out = unsafe { dev.alloc::<T>(out_len)? };
    let mut builder = func.builder();
    for view in &views {
        builder.arg(view);
    }
    builder.arg(&out);
    for scalar in scalars {
        match scalar {
            Scalar::I32(v) => builder.arg(v),
            Scalar::I64(v) => builder.arg(v),
            Scalar::Usize(v) => builder.arg(v),
            Scalar::F32(v) => builder.arg(v),
        };
    }
    // SAFETY: buffers in the kernel's order, then its scalars in their C types (the caller's)
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}

/// threads per block of the grid-stride kernels (RoPE, SwiGLU)
const ELEMENTWISE_THREADS: u32 = 256;

/// A grid-stride kernel over `n` elements: a thread each, the grid capped at 2³¹ − 1 blocks.
fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(ELEMENTWISE_THREADS as usize)
                .min(i32::MAX as usize) as u32,
            1,
            1,
        ),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The longest row a kernel's `int` column loop (`c += step`) walks without overflowing.
const fn max_row(step: u32) -> usize {
    (i32::MAX as u32 - step) as usize
}

/// The kernel's view of a contiguous input (its offset applied); `what` names the op and input
/// in the error.
fn contiguous_view<'a, T>(
    src: &'a CudaSlice<T>,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(src.slice(start..end)),
        None => candle_core::bail!("{what}: contiguous input expected"),
    }
}

pub(crate) mod attention {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaStorage, Map2, Map3};
    use candle_core::{CpuStorage, CudaDevice, Layout, Shape, Tensor, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "unlearn_attention";
    /// rows (one warp each) per block of the kernels
    const ROWS_PER_BLOCK: u32 = 4;

    /// Whether the fused kernels take this call: `cuda_fusable` scores [B, H, T, C] with a mask
    /// of the same dtype and shape [B, 1, T, C].
    pub fn applies(scores: &Tensor, mask: &Tensor) -> bool {
        let (sd, md) = (scores.dims(), mask.dims());
        crate::model::ops::cuda_fusable(scores)
            && mask.dtype() == scores.dtype()
            && sd.len() == 4
            && md == [sd[0], 1, sd[2], sd[3]]
            && sd.iter().all(|&d| d > 0)
            && sd[3] <= super::max_row(32)
            && sd[1] * sd[2] <= i32::MAX as usize
            && sd[0] * sd[1] * sd[2] <= i32::MAX as usize
    }

    /// (rows, cols, heads, t_q) of scores [B, H, T, C], checked against the mask [B, 1, T, C]:
    /// the kernels read B·T·C mask values.
    fn geometry(scores: &Layout, mask: &Layout) -> candle_core::Result<(i64, i32, i32, i32)> {
        let (b, h, t, c) = scores.shape().dims4()?;
        if mask.dims() != [b, 1, t, c] {
            candle_core::bail!(
                "masked-softmax: mask {:?} for scores {:?}",
                mask.shape(),
                scores.shape()
            );
        }
        Ok(((b * h * t) as i64, c as i32, h as i32, t as i32))
    }

    /// Runs the attention.cu kernel `root` (its `_f32`, `_bf16` or `_f16` form, for T) over the
    /// rows of the scores. Every kernel there takes (inputs…, output, rows, cols, heads, t_q,
    /// scale).
    fn launch<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        root: &str,
        inputs: &[(&CudaSlice<T>, &Layout, &str)],
        scores: &Layout,
        mask: &Layout,
        scale: f32,
    ) -> candle_core::Result<CudaSlice<T>> {
        use super::Scalar::{F32, I32, I64};
        let (rows, cols, heads, t_q) = geometry(scores, mask)?;
        let cfg = LaunchConfig {
            grid_dim: ((rows as u64).div_ceil(ROWS_PER_BLOCK as u64) as u32, 1, 1),
            block_dim: (32, ROWS_PER_BLOCK, 1),
            shared_mem_bytes: 0,
        };
        let scalars = [I64(rows), I32(cols), I32(heads), I32(t_q), F32(scale)];
        // the kernels write every element of every row
        let out_len = scores.shape().elem_count();
        super::launch(dev, (PTX, MODULE), root, inputs, out_len, &scalars, cfg)
    }

    /// softmax(scores · scale + mask); the backward is [`MaskedSoftmaxGrad`].
    pub struct MaskedSoftmax {
        pub scale: f32,
    }

    struct Forward(f32);
    impl Map2 for Forward {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            scores: &CudaSlice<T>,
            scores_l: &Layout,
            mask: &CudaSlice<T>,
            mask_l: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            let inputs = [
                (scores, scores_l, "masked-softmax scores"),
                (mask, mask_l, "masked-softmax mask"),
            ];
            launch(dev, "masked_softmax", &inputs, scores_l, mask_l, self.0)
        }
    }

    impl candle_core::CustomOp2 for MaskedSoftmax {
        fn name(&self) -> &'static str {
            "masked-softmax"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("masked-softmax: CUDA only (the CPU uses the composed form)")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            super::map::map2(&Forward(self.scale), s1, l1, s2, l2)
        }

        fn bwd(
            &self,
            scores: &Tensor,
            mask: &Tensor,
            _probs: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let op = MaskedSoftmaxGrad { scale: self.scale };
            let d_scores = scores.apply_op3_no_bwd(mask, &grad.contiguous()?, &op)?;
            // the mask is a constant of the batch, never trained
            Ok((Some(d_scores), None))
        }
    }

    /// ∂scores of [`MaskedSoftmax`]: scale · p ⊙ (g − Σ g⊙p), p recomputed in f32 from the
    /// scores.
    struct MaskedSoftmaxGrad {
        scale: f32,
    }

    struct Backward(f32);
    impl Map3 for Backward {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            scores: &CudaSlice<T>,
            scores_l: &Layout,
            mask: &CudaSlice<T>,
            mask_l: &Layout,
            grad: &CudaSlice<T>,
            grad_l: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            if grad_l.shape() != scores_l.shape() {
                candle_core::bail!(
                    "masked-softmax backward: gradient {:?} for scores {:?}",
                    grad_l.shape(),
                    scores_l.shape()
                );
            }
            let inputs = [
                (scores, scores_l, "masked-softmax scores"),
                (mask, mask_l, "masked-softmax mask"),
                (grad, grad_l, "masked-softmax gradient"),
            ];
            launch(dev, "masked_softmax_bwd", &inputs, scores_l, mask_l, self.0)
        }
    }

    impl candle_core::CustomOp3 for MaskedSoftmaxGrad {
        fn name(&self) -> &'static str {
            "masked-softmax-grad"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("masked-softmax-grad: CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            super::map::map3(&Backward(self.scale), s1, l1, s2, l2, s3, l3)
        }
    }
}

/// Launches of src/cuda/nll.cu for `FusedNll` and `FusedNllGrad` (src/model/ops.rs).
pub(crate) mod nll {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{kernel_name, Map1, WrapErr};
    use candle_core::{CudaDevice, Layout, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nll.ptx"));
    const MODULE: &str = "unlearn_nll";
    /// threads per block, one block per row: a multiple of 32, at most 1024 (nll.cu keeps one
    /// partial result per warp)
    const THREADS: u32 = 256;

    fn launch_config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn logits_view<'a, T>(
        x: &'a CudaSlice<T>,
        layout: &Layout,
    ) -> candle_core::Result<(
        candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>,
        usize,
        i32,
    )> {
        let (n, v) = layout.shape().dims2()?;
        // one block per row: the grid's x dimension takes at most 2³¹ − 1 blocks
        if n == 0 || v == 0 || v > super::max_row(THREADS) || n > i32::MAX as usize {
            candle_core::bail!("fused-nll: {n} rows of {v} logits do not fit the kernel");
        }
        Ok((
            super::contiguous_view(x, layout, "fused-nll logits")?,
            n,
            v as i32,
        ))
    }

    /// f32 NLL per row of the logits [N, V].
    pub fn forward<T: DeviceRepr + WithDType>(
        x: &CudaSlice<T>,
        layout: &Layout,
        labels: &[i64],
        dev: &CudaDevice,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let (x, n, v) = logits_view(x, layout)?;
        let labels = dev.clone_htod(labels)?;
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("nll_fwd"), MODULE, PTX)?;
        // SAFETY: the kernel writes every row's loss, ignored rows included
        let nll = unsafe { dev.alloc::<f32>(n)? };
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&labels);
        builder.arg(&nll);
        candle_core::builder_arg!(builder, v);
        // SAFETY: (logits, labels, nll, v) is the kernel's signature
        unsafe { builder.launch(launch_config(n)) }.w()?;
        Ok(nll)
    }

    /// The gradient g·(softmax − onehot) of the logits, in their dtype.
    pub struct Backward<'a> {
        pub labels: &'a [i64],
        pub upstream: &'a [f32],
    }

    impl Map1 for Backward<'_> {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            x: &CudaSlice<T>,
            dev: &CudaDevice,
            layout: &Layout,
        ) -> candle_core::Result<CudaSlice<T>> {
            let (x, n, v) = logits_view(x, layout)?;
            let labels = dev.clone_htod(self.labels)?;
            let upstream = dev.clone_htod(self.upstream)?;
            let func = dev.get_or_load_custom_func(&kernel_name::<T>("nll_bwd"), MODULE, PTX)?;
            // SAFETY: the kernel writes every element, zeros for ignored rows
            let grad = unsafe { dev.alloc::<T>(layout.shape().elem_count())? };
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&labels);
            builder.arg(&upstream);
            builder.arg(&grad);
            candle_core::builder_arg!(builder, v);
            // SAFETY: (logits, labels, upstream, grad, v) is the kernel's signature
            unsafe { builder.launch(launch_config(n)) }.w()?;
            Ok(grad)
        }
    }
}

/// Element-wise kernels of src/cuda/swiglu.cu: inputs of one shape and dtype, one output like
/// them; each kernel takes (inputs…, output, n).
pub(crate) mod elementwise {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{Map2, Map3};
    use candle_core::{CudaDevice, Layout, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    const MODULE: &str = "unlearn_swiglu";

    fn launch<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        root: &str,
        inputs: &[(&CudaSlice<T>, &Layout)],
    ) -> candle_core::Result<CudaSlice<T>> {
        let shape = inputs[0].1.shape();
        let n = shape.elem_count();
        for (_, layout) in inputs {
            if layout.shape() != shape {
                candle_core::bail!(
                    "{root}: inputs of shapes {shape:?} and {:?}",
                    layout.shape()
                );
            }
        }
        if n == 0 {
            candle_core::bail!("{root}: empty input");
        }
        let inputs: Vec<_> = inputs.iter().map(|&(s, l)| (s, l, root)).collect();
        // (inputs…, output, n as size_t) is every swiglu.cu kernel's signature, and each writes
        // all n elements (a grid-stride loop)
        let scalars = [super::Scalar::Usize(n)];
        let cfg = super::elementwise_config(n);
        super::launch(dev, (PTX, MODULE), root, &inputs, n, &scalars, cfg)
    }

    /// The kernel of that name (`_f32`, `_bf16` or `_f16` for the inputs' dtype).
    pub struct Kernel(pub &'static str);

    impl Map2 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            s1: &CudaSlice<T>,
            l1: &Layout,
            s2: &CudaSlice<T>,
            l2: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            launch(dev, self.0, &[(s1, l1), (s2, l2)])
        }
    }

    impl Map3 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            s1: &CudaSlice<T>,
            l1: &Layout,
            s2: &CudaSlice<T>,
            l2: &Layout,
            s3: &CudaSlice<T>,
            l3: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            launch(dev, self.0, &[(s1, l1), (s2, l2), (s3, l3)])
        }
    }
}

/// The packed SwiGLU kernels of src/cuda/swiglu.cu for `FusedSwigluPacked` and its gradient
/// (src/model/ops.rs): y [.., 2·inter] holds [gate | up] in each row.
pub(crate) mod swiglu_packed {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{Map1, Map2};
    use candle_core::{CudaDevice, Layout, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
    const MODULE: &str = "unlearn_swiglu";

    /// `swiglu_packed` (input y) or `swiglu_packed_bwd` (y and the gradient of the output).
    pub struct Kernel {
        pub root: &'static str,
        pub inter: usize,
    }

    impl Kernel {
        /// Launches over n = rows · inter (inputs…, output of `out_len`, n, inter).
        fn launch<T: DeviceRepr + WithDType>(
            &self,
            dev: &CudaDevice,
            inputs: &[(&CudaSlice<T>, &Layout, &str)],
            out_len: usize,
        ) -> candle_core::Result<CudaSlice<T>> {
            use super::Scalar::Usize;
            let y_l = inputs[0].1;
            let n = y_l.shape().elem_count() / 2;
            if self.inter == 0 || y_l.dims().last() != Some(&(2 * self.inter)) || n == 0 {
                candle_core::bail!(
                    "{}: y {:?} is not [.., 2 × {}]",
                    self.root,
                    y_l.shape(),
                    self.inter
                );
            }
            if let Some((_, grad_l, _)) = inputs.get(1) {
                let want = &y_l.dims()[..y_l.dims().len() - 1];
                let dims = grad_l.dims();
                if dims.split_last() != Some((&self.inter, want)) {
                    candle_core::bail!(
                        "{}: gradient {:?} for y {:?}",
                        self.root,
                        grad_l.shape(),
                        y_l.shape()
                    );
                }
            }
            // (inputs…, output, n as size_t, inter as size_t) is both kernels' signature; they
            // write all out_len elements (a grid-stride loop over n = rows × inter, one write
            // each forward, two backward)
            let scalars = [Usize(n), Usize(self.inter)];
            let cfg = super::elementwise_config(n);
            super::launch(
                dev,
                (PTX, MODULE),
                self.root,
                inputs,
                out_len,
                &scalars,
                cfg,
            )
        }
    }

    impl Map1 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            y: &CudaSlice<T>,
            dev: &CudaDevice,
            y_l: &Layout,
        ) -> candle_core::Result<CudaSlice<T>> {
            let out_len = y_l.shape().elem_count() / 2;
            self.launch(dev, &[(y, y_l, "packed swiglu y")], out_len)
        }
    }

    impl Map2 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            y: &CudaSlice<T>,
            y_l: &Layout,
            grad: &CudaSlice<T>,
            grad_l: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            let inputs = [
                (y, y_l, "packed swiglu y"),
                (grad, grad_l, "packed swiglu gradient"),
            ];
            self.launch(dev, &inputs, y_l.shape().elem_count())
        }
    }
}

/// Launches of src/cuda/rms_norm.cu for `FusedRmsNorm` and `RmsNormGrad` (src/model/ops.rs):
/// one block per row of x [.., d], the weight [d].
pub(crate) mod rms_norm {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{Map2, Map3};
    use candle_core::{CudaDevice, Layout, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
    const MODULE: &str = "unlearn_rms_norm";
    /// threads per block, one block per row: a multiple of 32, at most 1024 (rms_norm.cu keeps
    /// one partial sum per warp)
    const THREADS: u32 = 256;

    /// `rms_norm` (inputs x, w) or `rms_norm_bwd` (x, w and the gradient of y).
    pub struct Kernel {
        pub root: &'static str,
        pub eps: f32,
        pub plus_one: bool,
    }

    impl Kernel {
        fn launch<T: DeviceRepr + WithDType>(
            &self,
            dev: &CudaDevice,
            inputs: &[(&CudaSlice<T>, &Layout, &str)],
        ) -> candle_core::Result<CudaSlice<T>> {
            let (x_l, w_l) = (inputs[0].1, inputs[1].1);
            let d = w_l.shape().elem_count();
            let n = x_l.shape().elem_count();
            let fits = w_l.dims().len() == 1
                && x_l.dims().last() == Some(&d)
                && d > 0
                && n > 0
                && d <= super::max_row(THREADS)
                && n / d <= i32::MAX as usize;
            if !fits {
                candle_core::bail!(
                    "{}: weight {:?} for x {:?}",
                    self.root,
                    w_l.shape(),
                    x_l.shape()
                );
            }
            if let Some((_, grad_l, _)) = inputs.get(2) {
                if grad_l.shape() != x_l.shape() {
                    candle_core::bail!(
                        "{}: gradient {:?} for x {:?}",
                        self.root,
                        grad_l.shape(),
                        x_l.shape()
                    );
                }
            }
            use super::Scalar::{F32, I32};
            let cfg = LaunchConfig {
                grid_dim: ((n / d) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // (inputs…, output, d, eps, plus_one) is both kernels' signature; they write every
            // element of every row
            let scalars = [I32(d as i32), F32(self.eps), I32(self.plus_one as i32)];
            super::launch(dev, (PTX, MODULE), self.root, inputs, n, &scalars, cfg)
        }
    }

    impl Map2 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            x: &CudaSlice<T>,
            x_l: &Layout,
            w: &CudaSlice<T>,
            w_l: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            self.launch(dev, &[(x, x_l, "rms-norm x"), (w, w_l, "rms-norm weight")])
        }
    }

    impl Map3 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            x: &CudaSlice<T>,
            x_l: &Layout,
            w: &CudaSlice<T>,
            w_l: &Layout,
            g: &CudaSlice<T>,
            g_l: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            let inputs = [
                (x, x_l, "rms-norm x"),
                (w, w_l, "rms-norm weight"),
                (g, g_l, "rms-norm gradient"),
            ];
            self.launch(dev, &inputs)
        }
    }
}

/// Runs a candle CUDA map (one output slice in the inputs' dtype) over custom-op storages and
/// gives the output the first input's shape: the `cuda_fwd` of every op in src/model/ops.rs.
pub(crate) mod map {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, Map1, Map2, Map3};
    use candle_core::{CudaDevice, Layout, Shape};

    pub fn wrap(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
        CudaStorage {
            slice,
            device: dev.clone(),
        }
    }

    pub fn map1(
        m: &impl Map1,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let slice = m.map(&s.slice, s.device(), l)?;
        Ok((wrap(slice, s.device()), l.shape().clone()))
    }

    pub fn map2(
        m: &impl Map2,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let slice = m.map(&s1.slice, l1, &s2.slice, l2, s1.device())?;
        Ok((wrap(slice, s1.device()), l1.shape().clone()))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn map3(
        m: &impl Map3,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let slice = m.map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, s1.device())?;
        Ok((wrap(slice, s1.device()), l1.shape().clone()))
    }
}

/// Launch of src/cuda/rope.cu for `FusedRope` (src/model/ops.rs).
pub(crate) mod rope {
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaStorage, Map3};
    use candle_core::{CudaDevice, Layout, Shape, Storage, Tensor, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
    const MODULE: &str = "unlearn_rope";

    /// x [B, H, T, D] rotated by the tables cos, sin [B, 1, T, half].
    struct Rope;

    impl Map3 for Rope {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            x: &CudaSlice<T>,
            x_l: &Layout,
            cos: &CudaSlice<T>,
            cos_l: &Layout,
            sin: &CudaSlice<T>,
            sin_l: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            let (b, h, t, d) = x_l.shape().dims4()?;
            let half = cos_l.dims().last().copied().unwrap_or(0);
            if cos_l.dims() != [b, 1, t, half] || sin_l.dims() != cos_l.dims() || 2 * half > d {
                candle_core::bail!(
                    "fused-rope: tables {:?} / {:?} for x {:?}",
                    cos_l.shape(),
                    sin_l.shape(),
                    x_l.shape()
                );
            }
            let n = x_l.shape().elem_count();
            if n == 0 || d > i32::MAX as usize || h * t > i32::MAX as usize {
                candle_core::bail!("fused-rope: x {:?} does not fit the kernel", x_l.shape());
            }
            use super::Scalar::{Usize, I32};
            let inputs = [
                (x, x_l, "fused-rope x"),
                (cos, cos_l, "fused-rope cos"),
                (sin, sin_l, "fused-rope sin"),
            ];
            // (x, cos, sin, out, n as size_t, d, half, heads, t) is the kernel's signature; it
            // writes all n elements (a grid-stride loop)
            let scalars = [
                Usize(n),
                I32(d as i32),
                I32(half as i32),
                I32(h as i32),
                I32(t as i32),
            ];
            let cfg = super::elementwise_config(n);
            super::launch(dev, (PTX, MODULE), "rope", &inputs, n, &scalars, cfg)
        }
    }

    /// `FusedRope`'s forward on CUDA: x's storage with the op's (CUDA) tables.
    pub fn forward(
        x: &CudaStorage,
        x_l: &Layout,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (cos_storage, cos_l) = cos.storage_and_layout();
        let (sin_storage, sin_l) = sin.storage_and_layout();
        match (&*cos_storage, &*sin_storage) {
            (Storage::Cuda(cos_s), Storage::Cuda(sin_s))
                if cos_s.device.same_device(x.device()) && sin_s.device.same_device(x.device()) =>
            {
                super::map::map3(&Rope, x, x_l, cos_s, cos_l, sin_s, sin_l)
            }
            _ => candle_core::bail!("fused-rope: the tables are not on x's GPU"),
        }
    }
}
