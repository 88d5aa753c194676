//! The host side of a CUDA model: one gradient copy out and one parameter copy in per
//! step, through pinned host buffers that are allocated once and reused.
//!
//! UNVERIFIED: this code has not run on a GPU (the machines it was written on have none);
//! `scripts/gpu-check.sh` is what exercises it. It is used only when the model lives on a
//! CUDA device; on CPU the parameters are written straight into the tensors' storage and
//! a rank alone reduces its gradients in place ([`crate::model::cpu_f32`]).
use tch::{Device, Kind, Tensor};

use crate::model::Layout;
use crate::TrainError;

/// A pinned host tensor of at least `numel` f32 elements for `device`, reused across
/// steps (pinning memory is a slow driver call; copies from pinned memory are direct DMA).
fn pinned(staging: &mut Option<Tensor>, numel: i64, device: Device) -> Result<Tensor, TrainError> {
    if let Some(t) = staging.as_ref().filter(|t| t.numel() as i64 == numel) {
        return Ok(t.shallow_clone());
    }
    let t = Tensor::f_empty([numel], (Kind::Float, Device::Cpu))?.f_pin_memory(device)?;
    *staging = Some(t.shallow_clone());
    Ok(t)
}

/// The gradients of several micro-batches (`grads[micro][slot]`, on the device) into
/// `bufs[micro]` on the host: flattened and concatenated on the device, then one
/// device-to-host copy of all of them into pinned memory, then memcpys.
pub fn grads_to_host(
    grads: &[Vec<Tensor>],
    layout: &Layout,
    bufs: &mut [Vec<f32>],
    staging: &mut Option<Tensor>,
) -> Result<(), TrainError> {
    if grads.len() != bufs.len() || grads.is_empty() {
        return Err(TrainError::Config(format!(
            "{} gradient sets for {} host buffers",
            grads.len(),
            bufs.len()
        )));
    }
    let n = layout.total as i64;
    let device = grads[0]
        .iter()
        .find(|g| g.defined())
        .map(|g| g.device())
        .unwrap_or(Device::Cpu);
    let mut flat = Vec::with_capacity(grads.len());
    for set in grads {
        let mut parts = Vec::with_capacity(set.len());
        for (slot, g) in layout.slots.iter().zip(set) {
            parts.push(if g.defined() {
                g.f_to_kind(Kind::Float)?.f_reshape([-1])?
            } else {
                Tensor::f_zeros([slot.numel as i64], (Kind::Float, device))?
            });
        }
        flat.push(Tensor::f_cat(&parts, 0)?);
    }
    let all = Tensor::f_cat(&flat, 0)?;
    let host = pinned(staging, n * grads.len() as i64, device)?;
    host.shallow_clone().f_copy_(&all)?;
    for (k, buf) in bufs.iter_mut().enumerate() {
        if buf.len() != layout.total {
            return Err(TrainError::Config(format!(
                "host gradient buffer holds {} values, the model has {}",
                buf.len(),
                layout.total
            )));
        }
        host.f_narrow(0, k as i64 * n, n)?
            .f_copy_data(buf, layout.total)?;
    }
    Ok(())
}

/// The flat parameters into the model's tensors on `device`: a memcpy into pinned
/// memory, one host-to-device copy, then one device-side copy per tensor.
pub fn params_to_device(
    flat: &[f32],
    params: &[Tensor],
    layout: &Layout,
    device: Device,
    staging: &mut Option<Tensor>,
) -> Result<(), TrainError> {
    let host = pinned(staging, layout.total as i64, device)?;
    // SAFETY: `host` is a contiguous pinned f32 CPU tensor of `layout.total` elements
    // that only this function writes, and the copy below completes before it returns.
    let dst = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut f32, layout.total) };
    dst.copy_from_slice(flat);
    let on_device = host.f_to_device(device)?;
    tch::no_grad(|| -> Result<(), TrainError> {
        for (slot, t) in layout.slots.iter().zip(params) {
            let src = on_device
                .f_narrow(0, slot.offset as i64, slot.numel as i64)?
                .f_view(slot.shape.as_slice())?;
            t.shallow_clone().f_copy_(&src)?;
        }
        Ok(())
    })
}
