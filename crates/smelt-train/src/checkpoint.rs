//! Checkpoints: what a run needs to continue after an interruption, written after every epoch.
//!
//! A checkpoint is a folder `epoch-N` (N epochs done) holding the model being trained
//! (`model.onnx`, in its training form), the best model so far (`best.onnx`), the masks held
//! (`masks.safetensors`) and
//! `state.safetensors`: the optimizer's moments per weight plus, in its metadata, the step
//! counter, the history and the QAT form. It is written under a temporary name and renamed
//! into place when complete, so killing a run leaves the previous checkpoint intact; older
//! ones are then removed. Resuming with the same flags continues exactly where the run
//! stopped: the same shuffles, schedule and optimizer state give the same result.

use crate::optim::State;
use crate::Epoch;
use serde::{Deserialize, Serialize};
use smelt_ir::Model;
use smelt_prune::Masks;
use smelt_quant::qat::TrainingForm;
use smelt_tensor::{bail, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub struct Checkpoint {
    pub epochs_done: usize,
    pub step: usize,
    pub model: Model,
    pub best: Option<(f64, Model)>,
    pub states: HashMap<String, State>,
    pub history: Vec<Epoch>,
    pub form: Option<TrainingForm>,
    /// The masks held (given or made by gradual pruning).
    pub masks: Option<Masks>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    epochs_done: usize,
    step: usize,
    best_score: Option<f64>,
    history: Vec<Epoch>,
    /// Optimizer steps taken per weight (AdamW's bias correction needs them).
    steps: BTreeMap<String, u32>,
    form: Option<TrainingForm>,
}

const META_KEY: &str = "smelt.checkpoint";

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Input(format!("{what} {}: {e}", path.display()))
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Checkpoint {
    /// Writes `dir/epoch-N` atomically and removes older checkpoints in `dir`.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let name = format!("epoch-{}", self.epochs_done);
        let tmp = dir.join(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io("cannot clear", &tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
        smelt_onnx::save(&self.model, &tmp.join("model.onnx"))?;
        if let Some((_, best)) = &self.best {
            smelt_onnx::save(best, &tmp.join("best.onnx"))?;
        }
        let mut names: Vec<&String> = self.states.keys().collect();
        names.sort();
        let data: Vec<(String, Vec<u8>, usize)> = names
            .iter()
            .flat_map(|k| {
                let s = &self.states[*k];
                [
                    (format!("m/{k}"), bytes_of(&s.m), s.m.len()),
                    (format!("v/{k}"), bytes_of(&s.v), s.v.len()),
                ]
            })
            .collect();
        let views = data
            .iter()
            .map(|(k, b, n)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], b)
                    .map(|v| (k.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Invalid(format!("checkpoint tensor: {e}")))?;
        let meta = Meta {
            epochs_done: self.epochs_done,
            step: self.step,
            best_score: self.best.as_ref().map(|b| b.0),
            history: self.history.clone(),
            steps: names
                .iter()
                .map(|k| ((*k).clone(), self.states[*k].step))
                .collect(),
            form: self.form.clone(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| Error::Invalid(e.to_string()))?;
        let bytes = safetensors::serialize(views, Some(HashMap::from([(META_KEY.into(), json)])))
            .map_err(|e| Error::Invalid(format!("writing checkpoint: {e}")))?;
        if let Some(m) = &self.masks {
            let masks = tmp.join("masks.safetensors");
            std::fs::write(&masks, m.to_safetensors()?)
                .map_err(|e| io("cannot write", &masks, e))?;
        }
        let state = tmp.join("state.safetensors");
        std::fs::write(&state, bytes).map_err(|e| io("cannot write", &state, e))?;
        let done = dir.join(&name);
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(|e| io("cannot replace", &done, e))?;
        }
        std::fs::rename(&tmp, &done).map_err(|e| io("cannot finish", &done, e))?;
        for (n, old) in checkpoints(dir)? {
            if n < self.epochs_done {
                std::fs::remove_dir_all(&old).map_err(|e| io("cannot remove", &old, e))?;
            }
        }
        Ok(done)
    }

    /// The most recent complete checkpoint in `dir`, if any.
    pub fn latest(dir: &Path) -> Result<Option<Checkpoint>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let Some((_, path)) = checkpoints(dir)?.into_iter().max_by_key(|c| c.0) else {
            return Ok(None);
        };
        Checkpoint::load(&path).map(Some)
    }

    pub fn load(path: &Path) -> Result<Checkpoint> {
        let state = path.join("state.safetensors");
        let bytes = std::fs::read(&state).map_err(|e| io("cannot read", &state, e))?;
        let bad = |e: String| Error::Input(format!("checkpoint {}: {e}", state.display()));
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| bad("no smelt metadata".into()))?;
        let meta: Meta = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let floats = |key: &str| -> Result<Vec<f32>> {
            let t = st.tensor(key).map_err(|e| bad(format!("{key}: {e}")))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("{key} is not float32")));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut states = HashMap::new();
        for (name, &step) in &meta.steps {
            let (m, v) = (floats(&format!("m/{name}"))?, floats(&format!("v/{name}"))?);
            states.insert(name.clone(), State { m, v, step });
        }
        let model = smelt_onnx::load(&path.join("model.onnx"))?;
        // Optimizer moments must match the weights they belong to, or a resumed run would
        // update the wrong elements.
        for (name, s) in &states {
            let n = model.graph.initializers.get(name).map(|t| t.numel());
            if n != Some(s.m.len()) || n != Some(s.v.len()) {
                return Err(bad(format!(
                    "optimizer state for '{name}' does not match the model's weights"
                )));
            }
        }
        let best = match meta.best_score {
            Some(score) => Some((score, smelt_onnx::load(&path.join("best.onnx"))?)),
            None => None,
        };
        let masks = path.join("masks.safetensors");
        let masks = if masks.is_file() {
            Some(Masks::load(&masks)?)
        } else {
            None
        };
        if meta.history.len() != meta.epochs_done {
            bail!(Input, "checkpoint {}: inconsistent history", path.display());
        }
        Ok(Checkpoint {
            epochs_done: meta.epochs_done,
            step: meta.step,
            model,
            best,
            states,
            history: meta.history,
            form: meta.form,
            masks,
        })
    }
}

/// Complete checkpoint folders in `dir`: (epochs done, path).
fn checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))? {
        let e = e.map_err(|e| io("cannot list", dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("epoch-").and_then(|n| n.parse().ok()) {
            out.push((n, e.path()));
        }
    }
    Ok(out)
}
