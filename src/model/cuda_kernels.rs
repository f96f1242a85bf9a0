//! Launches of our own CUDA kernels (src/cuda/*.cu, compiled to PTX by build.rs) for the custom
//! ops of [`crate::model::ops`]. Built with the `cuda` feature only; never reached on the CPU.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, WrapErr};
use candle_core::{CudaDevice, Layout, WithDType};

use crate::model::launch::{Launch, Scalar};

/// A kernel source: the PTX build.rs compiled, and the module name it is loaded under.
type Module = (&'static str, &'static str);

/// The launch geometry of a plan from [`crate::model::launch`].
fn config(plan: &Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (plan.grid, 1, 1),
        block_dim: (plan.block.0, plan.block.1, 1),
        shared_mem_bytes: 0,
    }
}

/// Pushes a plan's scalars after the buffers, each in its C type.
fn push_scalars<'a>(builder: &mut LaunchArgs<'a>, scalars: &'a [Scalar]) {
    for scalar in scalars {
        match scalar {
            Scalar::I32(v) => builder.arg(v),
            Scalar::I64(v) => builder.arg(v),
            Scalar::Usize(v) => builder.arg(v),
            Scalar::F32(v) => builder.arg(v),
        };
    }
}

/// Launches `root` (its `_f32`, `_bf16` or `_f16` form, for T) of `module` as `plan` says (see
/// [`crate::model::launch`], where the emulated tests check each plan against the kernel): the
/// contiguous inputs in the kernel's order, a fresh output of `plan.out_len` elements, which
/// the kernel writes whole, then the plan's scalars.
fn launch<T: DeviceRepr + WithDType>(
    dev: &CudaDevice,
    module: Module,
    root: &str,
    inputs: &[(&CudaSlice<T>, &Layout, &str)],
    plan: &Launch,
) -> candle_core::Result<CudaSlice<T>> {
    if plan.out_len == 0 {
        candle_core::bail!("{root}: empty output (the plans reject empty inputs)");
    }
    let views = inputs
        .iter()
        .map(|(src, layout, what)| contiguous_view(src, layout, what))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (ptx, name) = module;
    let func = dev.get_or_load_custom_func(&kernel_name::<T>(root), name, ptx)?;
    // SAFETY: the kernel writes all out_len elements (the plan's contract, tested emulated)
    let out = unsafe { dev.alloc::<T>(plan.out_len)? };
    let mut builder = func.builder();
    for view in &views {
        builder.arg(view);
    }
    builder.arg(&out);
    push_scalars(&mut builder, &plan.scalars);
    // SAFETY: buffers in the kernel's order, then the plan's scalars in their C types
    unsafe { builder.launch(config(plan)) }.w()?;
    Ok(out)
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
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaStorage, Map2, Map3};
    use candle_core::{CudaDevice, Layout, Shape, WithDType};

    use crate::model::launch as plan;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "unlearn_attention";

    /// Runs the attention.cu kernel `root` (its `_f32`, `_bf16` or `_f16` form, for T) over the
    /// rows of the scores, as [`plan::attention`] lays it out.
    fn launch<T: DeviceRepr + WithDType>(
        dev: &CudaDevice,
        root: &str,
        inputs: &[(&CudaSlice<T>, &Layout, &str)],
        scores: &Layout,
        mask: &Layout,
        scale: f32,
    ) -> candle_core::Result<CudaSlice<T>> {
        let plan = plan::attention(scores.dims(), mask.dims(), scale)?;
        super::launch(dev, (PTX, MODULE), root, inputs, &plan)
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

    /// softmax(scores · scale + mask) (`ops::MaskedSoftmax` on CUDA).
    pub fn forward(
        scores: &CudaStorage,
        scores_l: &Layout,
        mask: &CudaStorage,
        mask_l: &Layout,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        super::map::map2(&Forward(scale), scores, scores_l, mask, mask_l)
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

    /// ∂scores of `ops::MaskedSoftmax` on CUDA: scale · p ⊙ (g − Σ g⊙p), p recomputed in f32
    /// from the scores.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        scores: &CudaStorage,
        scores_l: &Layout,
        mask: &CudaStorage,
        mask_l: &Layout,
        grad: &CudaStorage,
        grad_l: &Layout,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        super::map::map3(
            &Backward(scale),
            scores,
            scores_l,
            mask,
            mask_l,
            grad,
            grad_l,
        )
    }
}

/// Launches of src/cuda/nll.cu for `FusedNll` and `FusedNllGrad` (src/model/ops.rs).
pub(crate) mod nll {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{kernel_name, Map1, WrapErr};
    use candle_core::{CudaDevice, Layout, WithDType};

    use crate::model::launch::{self as plan, Launch};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nll.ptx"));
    const MODULE: &str = "unlearn_nll";

    /// The logits [N, V] as the kernel reads them, and [`plan::nll`]'s launch for them.
    fn logits_view<'a, T>(
        x: &'a CudaSlice<T>,
        layout: &Layout,
        backward: bool,
    ) -> candle_core::Result<(CudaView<'a, T>, Launch)> {
        let (n, v) = layout.shape().dims2()?;
        let plan = plan::nll(n, v, backward)?;
        Ok((super::contiguous_view(x, layout, "fused-nll logits")?, plan))
    }

    /// f32 NLL per row of the logits [N, V].
    pub fn forward<T: DeviceRepr + WithDType>(
        x: &CudaSlice<T>,
        layout: &Layout,
        labels: &[i64],
        dev: &CudaDevice,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let (x, plan) = logits_view(x, layout, false)?;
        let labels = dev.clone_htod(labels)?;
        let func = dev.get_or_load_custom_func(&kernel_name::<T>("nll_fwd"), MODULE, PTX)?;
        // SAFETY: the kernel writes every row's loss, ignored rows included
        let nll = unsafe { dev.alloc::<f32>(plan.out_len)? };
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&labels);
        builder.arg(&nll);
        super::push_scalars(&mut builder, &plan.scalars);
        // SAFETY: (logits, labels, nll, v) is the kernel's signature
        unsafe { builder.launch(super::config(&plan)) }.w()?;
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
            let (x, plan) = logits_view(x, layout, true)?;
            let labels = dev.clone_htod(self.labels)?;
            let upstream = dev.clone_htod(self.upstream)?;
            let func = dev.get_or_load_custom_func(&kernel_name::<T>("nll_bwd"), MODULE, PTX)?;
            // SAFETY: the kernel writes every element, zeros for ignored rows
            let grad = unsafe { dev.alloc::<T>(plan.out_len)? };
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&labels);
            builder.arg(&upstream);
            builder.arg(&grad);
            super::push_scalars(&mut builder, &plan.scalars);
            // SAFETY: (logits, labels, upstream, grad, v) is the kernel's signature
            unsafe { builder.launch(super::config(&plan)) }.w()?;
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
        let plan = crate::model::launch::elementwise(root, n)?;
        let inputs: Vec<_> = inputs.iter().map(|&(s, l)| (s, l, root)).collect();
        super::launch(dev, (PTX, MODULE), root, &inputs, &plan)
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
        /// Launches as [`crate::model::launch::swiglu_packed`] lays it out for y (and the
        /// gradient, backward).
        fn launch<T: DeviceRepr + WithDType>(
            &self,
            dev: &CudaDevice,
            inputs: &[(&CudaSlice<T>, &Layout, &str)],
        ) -> candle_core::Result<CudaSlice<T>> {
            let grad = inputs.get(1).map(|(_, l, _)| l.dims());
            let plan = crate::model::launch::swiglu_packed(inputs[0].1.dims(), grad, self.inter)?;
            super::launch(dev, (PTX, MODULE), self.root, inputs, &plan)
        }
    }

    impl Map1 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            y: &CudaSlice<T>,
            dev: &CudaDevice,
            y_l: &Layout,
        ) -> candle_core::Result<CudaSlice<T>> {
            self.launch(dev, &[(y, y_l, "packed swiglu y")])
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
            self.launch(dev, &inputs)
        }
    }
}

/// Launches of src/cuda/rms_norm.cu for `FusedRmsNorm` and `RmsNormGrad` (src/model/ops.rs):
/// one block per row of x [.., d], the weight [d].
pub(crate) mod rms_norm {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{Map2, Map3};
    use candle_core::{CudaDevice, Layout, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
    const MODULE: &str = "unlearn_rms_norm";

    /// `rms_norm` (inputs x, w) or `rms_norm_bwd` (x, w and the gradient of y).
    pub struct Kernel {
        pub root: &'static str,
        pub eps: f32,
        pub plus_one: bool,
    }

    impl Kernel {
        /// Launches as [`crate::model::launch::rms_norm`] lays it out.
        fn launch<T: DeviceRepr + WithDType>(
            &self,
            dev: &CudaDevice,
            inputs: &[(&CudaSlice<T>, &Layout, &str)],
        ) -> candle_core::Result<CudaSlice<T>> {
            let (x, w) = (inputs[0].1.dims(), inputs[1].1.dims());
            let grad = inputs.get(2).map(|(_, l, _)| l.dims());
            let plan = crate::model::launch::rms_norm(x, w, grad, self.eps, self.plus_one)?;
            super::launch(dev, (PTX, MODULE), self.root, inputs, &plan)
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

/// Launches of src/cuda/softcap.cu for `SoftCap` and its gradient (src/model/ops.rs).
pub(crate) mod softcap {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{Map1, Map2};
    use candle_core::{CudaDevice, Layout, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softcap.ptx"));
    const MODULE: &str = "unlearn_softcap";

    /// `softcap` over x (Map1), `softcap_grad` over x and the output gradient (Map2).
    pub struct Kernel {
        pub cap: f32,
    }

    impl Map1 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            x: &CudaSlice<T>,
            dev: &CudaDevice,
            x_l: &Layout,
        ) -> candle_core::Result<CudaSlice<T>> {
            let plan = crate::model::launch::softcap(x_l.shape().elem_count(), self.cap)?;
            super::launch(
                dev,
                (PTX, MODULE),
                "softcap",
                &[(x, x_l, "softcap x")],
                &plan,
            )
        }
    }

    impl Map2 for Kernel {
        fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
            &self,
            x: &CudaSlice<T>,
            x_l: &Layout,
            grad: &CudaSlice<T>,
            grad_l: &Layout,
            dev: &CudaDevice,
        ) -> candle_core::Result<CudaSlice<T>> {
            if x_l.shape() != grad_l.shape() {
                candle_core::bail!(
                    "softcap-grad: x {:?} and gradient {:?}",
                    x_l.shape(),
                    grad_l.shape()
                );
            }
            let plan = crate::model::launch::softcap(x_l.shape().elem_count(), self.cap)?;
            let inputs = [(x, x_l, "softcap x"), (grad, grad_l, "softcap gradient")];
            super::launch(dev, (PTX, MODULE), "softcap_grad", &inputs, &plan)
        }
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
            let plan = crate::model::launch::rope(x_l.dims(), cos_l.dims(), sin_l.dims())?;
            let inputs = [
                (x, x_l, "fused-rope x"),
                (cos, cos_l, "fused-rope cos"),
                (sin, sin_l, "fused-rope sin"),
            ];
            super::launch(dev, (PTX, MODULE), "rope", &inputs, &plan)
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

/// Launches of src/cuda/adamw.cu for the optimizer's in-place step (src/train/optim.rs).
pub(crate) mod adamw {
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::Layout;

    use crate::model::launch::Launch;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    const MODULE: &str = "unlearn_adamw";

    /// Runs `kernel` of adamw.cu (`adamw_moments_f32` or `adamw_param_f32`) as `plan` says, in
    /// place on the contiguous f32 `dst` with the contiguous f32 `src`: dst, src, then the
    /// plan's scalars. The caller checked that both hold the plan's elements.
    pub fn in_place(
        kernel: &str,
        dst: &mut CudaStorage,
        dst_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        plan: &Launch,
    ) -> candle_core::Result<()> {
        let dev = dst.device.clone();
        let src = super::contiguous_view(src.as_cuda_slice::<f32>()?, src_l, kernel)?;
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("{kernel}: contiguous destination expected")
        };
        let mut dst = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&mut dst);
        builder.arg(&src);
        super::push_scalars(&mut builder, &plan.scalars);
        // SAFETY: the two buffers in the kernel's order, then the plan's scalars in their C
        // types (tests/cuda_kernels_emulated.rs runs the same plans); the kernel touches the
        // plan's n elements of each, which the caller checked both hold
        unsafe { builder.launch(super::config(plan)) }.w()?;
        Ok(())
    }
}
