//! Pruning masks: which weights are kept. Part of the result, so fine-tuning can hold pruned
//! weights at exactly zero; saved beside the model as safetensors (one uint8 tensor per
//! weight, 1 = kept).

use smelt_ir::Graph;
use smelt_tensor::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub shape: Vec<usize>,
    pub keep: Vec<bool>,
}

impl Mask {
    pub fn sparsity(&self) -> f64 {
        let zeros = self.keep.iter().filter(|k| !**k).count();
        zeros as f64 / self.keep.len().max(1) as f64
    }
}

/// Masks by weight (initializer) name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Masks(pub BTreeMap<String, Mask>);

impl Masks {
    /// Zeroes the pruned weights of `g` in place.
    pub fn apply(&self, g: &mut Graph) -> Result<()> {
        for (name, m) in &self.0 {
            let Some(w) = g.initializers.get_mut(name) else {
                bail!(
                    Invalid,
                    "mask for '{name}', which is not a weight of the model"
                );
            };
            if w.shape() != m.shape.as_slice() {
                bail!(
                    Input,
                    "mask for '{name}' has shape {:?}, the weight {:?}",
                    m.shape,
                    w.shape()
                );
            }
            for (x, &k) in w.as_mut_slice::<f32>()?.iter_mut().zip(&m.keep) {
                if !k {
                    *x = 0.0;
                }
            }
        }
        Ok(())
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .0
            .iter()
            .map(|(k, m)| {
                (
                    k.clone(),
                    m.keep.iter().map(|&b| u8::from(b)).collect(),
                    m.shape.clone(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(k, b, s)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::U8, s.clone(), b)
                    .map(|v| (k.clone(), v))
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| smelt_tensor::Error::Invalid(format!("mask tensor: {e}")))?;
        let meta = std::collections::HashMap::from([(
            "format".to_string(),
            "smelt pruning masks: 1 = kept".to_string(),
        )]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| smelt_tensor::Error::Invalid(format!("writing masks: {e}")))
    }

    pub fn from_safetensors(bytes: &[u8]) -> Result<Masks> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
            smelt_tensor::Error::Input(format!(
                "not a masks file (smelt writes them as safetensors): {e}"
            ))
        })?;
        let mut out = BTreeMap::new();
        for (name, v) in st.tensors() {
            if v.dtype() != safetensors::Dtype::U8 {
                bail!(Input, "mask '{name}' is {:?}, expected U8", v.dtype());
            }
            out.insert(
                name.clone(),
                Mask {
                    shape: v.shape().to_vec(),
                    keep: v.data().iter().map(|&b| b != 0).collect(),
                },
            );
        }
        Ok(Masks(out))
    }

    pub fn load(path: &Path) -> Result<Masks> {
        let bytes = std::fs::read(path).map_err(|e| {
            smelt_tensor::Error::Input(format!("cannot read masks {}: {e}", path.display()))
        })?;
        Masks::from_safetensors(&bytes).map_err(|e| e.context(path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip() {
        let mut m = Masks::default();
        m.0.insert(
            "w".into(),
            Mask {
                shape: vec![2, 3],
                keep: vec![true, false, true, false, false, true],
            },
        );
        let back = Masks::from_safetensors(&m.to_safetensors().unwrap()).unwrap();
        assert_eq!(back, m);
        assert!((m.0["w"].sparsity() - 0.5).abs() < 1e-12);
    }
}
