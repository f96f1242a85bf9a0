//! A composed function of three tensors as one node of the graph, recomputed in the backward
//! (what `torch.utils.checkpoint` does).
//!
//! candle keeps every input of every node until the backward is over, so a function composed of
//! many ops keeps every intermediate result, whether or not a gradient needs it. [`recompute3`]
//! runs the function without a graph and records one node that keeps only its three inputs; the
//! node's backward runs the function again on copies of the inputs, with a graph, and
//! back-propagates the incoming gradient through it. The values and gradients are those of the
//! composed form, bit for bit (the same ops in the same order); the cost is one more forward of
//! the function, and its intermediates exist only while its own backward runs.
//!
//! Only the explicit inputs get gradients: a tensor the function captures (a mask, a constant)
//! must not need one, or its gradient would be lost.
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, Var};

use crate::model::ops;

type Function = dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// `f(a, b, c)`, recorded in the graph as one node that keeps only `a`, `b` and `c` and runs `f`
/// again in its backward. Without a gradient to track (no input a variable or the result of a
/// tracked op) it is `f(a, b, c)` itself.
pub fn recompute3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if ![a, b, c].iter().any(|t| t.track_op()) {
        return f(a, b, c);
    }
    // detached inputs: no op of f records anything
    let out = f(&a.detach(), &b.detach(), &c.detach())?;
    let op = Recomputed {
        f: Box::new(f),
        out: Mutex::new(Some(out)),
    };
    a.apply_op3(b, c, op)
}

struct Recomputed {
    f: Box<Function>,
    /// the forward's result, computed before the node was recorded, until the forward hands it
    /// to the node
    out: Mutex<Option<Tensor>>,
}

impl Recomputed {
    /// The result computed in [`recompute3`], as a storage of backend `S` (a copy: a node owns
    /// its storage; the result is the size of an output, not of every intermediate).
    fn take<S: BackendStorage>(
        &self,
        pick: for<'a> fn(&'a Storage) -> Option<&'a S>,
    ) -> candle_core::Result<(S, Shape)> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("recompute: a forward panicked".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recompute: the forward ran twice".into()))?;
        let (storage, layout) = out.storage_and_layout();
        let storage = ops::held_storage(&storage, pick, "recompute", "result")?;
        Ok((storage.try_clone(layout)?, out.shape().clone()))
    }
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        "recompute"
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
        self.take(ops::cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.take(ops::cuda_storage)
    }

    /// `f` again on copies of the inputs that need a gradient, made variables, and the backward
    /// of `sum(f(…) ⊙ grad)`: its gradient at `f`'s result is `grad` exactly (1 · grad), so what
    /// reaches the inputs is what the composed form's backward computes. `None` for an input
    /// that needs no gradient or does not reach the result.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // (argument, whether it is a fresh variable whose gradient is wanted)
        let leaf = |t: &Tensor| -> candle_core::Result<(Tensor, bool)> {
            Ok(match t.track_op() {
                true => (Var::from_tensor(&t.detach())?.into_inner(), true),
                false => (t.detach(), false),
            })
        };
        let (a, b, c) = (leaf(a)?, leaf(b)?, leaf(c)?);
        let out = (self.f)(&a.0, &b.0, &c.0)?;
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        let grad_of = |(t, wanted): &(Tensor, bool)| grads.get(t).filter(|_| *wanted).cloned();
        Ok((grad_of(&a), grad_of(&b), grad_of(&c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A function that uses an input twice and one input not at all: the recomputed node's
    /// value and gradients are the composed form's bit for bit, an input without a gradient
    /// gets none, and one that does not reach the result gets none either.
    #[test]
    fn recomputed_node_equals_the_composed_form_bit_for_bit() {
        let dev = Device::Cpu;
        let x = Var::from_vec(
            (0..12).map(|i| 0.3 * i as f32 - 1.7).collect(),
            (3, 4),
            &dev,
        )
        .unwrap();
        let w = Var::from_vec((0..20).map(|i| (i as f32).sin()).collect(), (4, 5), &dev).unwrap();
        let unused = Var::ones((2,), DType::F32, &dev).unwrap();
        let f = |x: &Tensor, w: &Tensor, _: &Tensor| -> candle_core::Result<Tensor> {
            let h = x.matmul(w)?.tanh()?;
            (&h * &h)?.exp()? + x.sum_keepdim(1)?.broadcast_as(h.shape())?
        };
        let seed = Tensor::from_vec(
            (0..15).map(|i| 1.0 - 0.1 * i as f32).collect(),
            (3, 5),
            &dev,
        )
        .unwrap();
        for x_tracked in [true, false] {
            let x_in = if x_tracked {
                x.as_tensor().clone()
            } else {
                x.as_tensor().detach()
            };
            let want = f(&x_in, w.as_tensor(), unused.as_tensor()).unwrap();
            let got = recompute3(&x_in, w.as_tensor(), unused.as_tensor(), f).unwrap();
            assert_eq!(bits(&got), bits(&want));
            let grads = |y: &Tensor| (y * &seed).unwrap().sum_all().unwrap().backward().unwrap();
            let (gr, gw) = (grads(&got), grads(&want));
            let w_grad = gr.get(w.as_tensor()).expect("gradient of w");
            assert_eq!(bits(w_grad), bits(gw.get(w.as_tensor()).unwrap()));
            assert!(bits(w_grad).iter().any(|&b| b != 0));
            match x_tracked {
                true => assert_eq!(
                    bits(gr.get(x.as_tensor()).expect("gradient of x")),
                    bits(gw.get(x.as_tensor()).unwrap())
                ),
                false => assert!(gr.get(x.as_tensor()).is_none()),
            }
            assert!(gr.get(unused.as_tensor()).is_none());
        }
        // nothing tracked: f itself, no node
        let detached = [&x, &w, &unused].map(|v| v.as_tensor().detach());
        let plain = recompute3(&detached[0], &detached[1], &detached[2], f).unwrap();
        assert!(!plain.track_op());
        assert_eq!(
            bits(&plain),
            bits(&f(&detached[0], &detached[1], &detached[2]).unwrap())
        );
    }
}
