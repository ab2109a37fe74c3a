//! Static calibration: run the float model on sample inputs and feed each activation that
//! will be quantized to an observer.

use crate::observer::{Observer, ObserverKind};
use indexmap::IndexMap;
use rayon::prelude::*;
use smelt_engine::Captured;
use smelt_ir::Model;
use smelt_tensor::{bail, Result};

pub use smelt_engine::{for_each_run, Feed};

/// Observes `values` over every feed. Fails on an empty calibration set, on inputs the model
/// rejects (wrong shape or type: the engine names the input), and on NaN/Inf activations.
pub fn calibrate(
    model: &Model,
    values: &[String],
    feeds: &[Feed],
    kind: ObserverKind,
    mut progress: impl FnMut(usize, usize),
) -> Result<(IndexMap<String, Observer>, Captured)> {
    if feeds.is_empty() {
        bail!(
            Input,
            "the calibration set is empty: static quantization needs sample inputs"
        );
    }
    let mut observers: IndexMap<String, Observer> = values
        .iter()
        .map(|v| (v.clone(), Observer::new(kind)))
        .collect();
    // The first batch's values are kept: the manifest reports each range's error on them.
    let mut first = Captured::new();
    for_each_run(model, values, feeds, |b, captured| {
        observers
            .iter_mut()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(name, obs)| -> Result<()> {
                let t = captured.get(name).ok_or_else(|| {
                    smelt_tensor::Error::Invalid(format!("'{name}' was not captured"))
                })?;
                // Borrow f32 data in place; other float types are converted.
                let owned;
                let v: &[f32] = match t.as_slice::<f32>() {
                    Ok(s) => s,
                    Err(_) => {
                        owned = t.to_f32_vec()?;
                        &owned
                    }
                };
                obs.observe(v).map_err(|e| {
                    e.context(format!(
                        "activation '{name}' in calibration batch {}",
                        b + 1
                    ))
                })
            })
            .collect::<Result<()>>()?;
        progress(b + 1, feeds.len());
        if b == 0 {
            first = captured;
        }
        Ok(())
    })?;
    Ok((observers, first))
}
