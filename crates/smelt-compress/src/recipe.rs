//! Recipes: the stages of a compression run, as a TOML file.
//!
//! ```toml
//! name = "prune50-int8"
//! [[stage]]
//! kind = "prune"
//! pattern = "unstructured"   # or "2:4", "channels"
//! sparsity = 0.5
//! [[stage]]
//! kind = "finetune"
//! epochs = 1
//! [[stage]]
//! kind = "quantize"
//! mode = "static"
//! ```
//!
//! Unknown keys and stage kinds are errors, so a typo never silently changes a run.

use serde::{Deserialize, Serialize};
use smelt_tensor::{bail, Result};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(rename = "stage", default)]
    pub stages: Vec<Stage>,
    /// A fine-tuning stage the budget search adds when this recipe misses the accuracy budget
    /// (`[recovery]`, kind "finetune"): with `qat`, it replaces the final quantize stage;
    /// otherwise it runs just before quantization (or last).
    #[serde(default)]
    pub recovery: Option<Stage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Stage {
    Prune {
        /// unstructured, N:M (e.g. "2:4") or channels.
        #[serde(default = "unstructured")]
        pattern: String,
        sparsity: f64,
        /// layer or global (unstructured).
        #[serde(default = "layer")]
        scope: String,
        /// magnitude, l2, wanda, taylor or random.
        #[serde(default = "magnitude")]
        criterion: String,
        /// Channels: `sparsity` is the fraction of all channels removed, shared out between
        /// layers by their measured sensitivity instead of the same fraction everywhere.
        #[serde(default)]
        per_layer: bool,
    },
    Finetune {
        #[serde(default = "one")]
        epochs: usize,
        #[serde(default = "default_lr")]
        lr: f32,
        #[serde(default = "batch")]
        batch: usize,
        /// sgd or adamw.
        #[serde(default = "sgd")]
        optimizer: String,
        #[serde(default)]
        max_steps: Option<usize>,
        #[serde(default = "unit")]
        loss_temperature: f32,
        /// Distil from the original model with this weight (0: labels only).
        #[serde(default)]
        distill: f32,
        /// Quantization-aware training (w8a8 or w4a8): the stage quantizes, so no quantize
        /// stage follows it.
        #[serde(default)]
        qat: Option<String>,
    },
    Quantize {
        /// static, dynamic or weight-only.
        #[serde(default = "static_mode")]
        mode: String,
        /// int8, int4, ... (default: int8; int4 for weight-only).
        #[serde(default)]
        weight_type: Option<String>,
        /// tensor, channel or block.
        #[serde(default)]
        granularity: Option<String>,
        #[serde(default = "block")]
        block_size: usize,
        /// minmax, percentile, entropy or mse.
        #[serde(default = "minmax")]
        observer: String,
        /// Training samples used to calibrate (static mode).
        #[serde(default = "calib")]
        calib: usize,
    },
}

fn unstructured() -> String {
    "unstructured".into()
}
fn layer() -> String {
    "layer".into()
}
fn magnitude() -> String {
    "magnitude".into()
}
fn one() -> usize {
    1
}
fn default_lr() -> f32 {
    1e-3
}
fn batch() -> usize {
    64
}
fn sgd() -> String {
    "sgd".into()
}
fn unit() -> f32 {
    1.0
}
fn static_mode() -> String {
    "static".into()
}
fn block() -> usize {
    128
}
fn minmax() -> String {
    "minmax".into()
}
fn calib() -> usize {
    500
}

impl Stage {
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Prune { .. } => "prune",
            Stage::Finetune { .. } => "finetune",
            Stage::Quantize { .. } => "quantize",
        }
    }
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Recipe> {
        let r: Recipe = toml::from_str(text)
            .map_err(|e| smelt_tensor::Error::Input(format!("recipe: {}", e.message())))?;
        r.check()?;
        Ok(r)
    }

    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            smelt_tensor::Error::Input(format!("cannot read recipe {}: {e}", path.display()))
        })?;
        Recipe::parse(&text).map_err(|e| e.context(path.display().to_string()))
    }

    /// This recipe with its recovery fine-tuning in place, if it has one.
    pub fn recovered(&self) -> Option<Recipe> {
        let rec = self.recovery.clone()?;
        let Stage::Finetune { qat, .. } = &rec else {
            return None;
        };
        let mut stages = self.stages.clone();
        // Where quantization happens: a quantize stage, or a fine-tuning stage with QAT.
        let quant = stages.iter().position(|s| {
            matches!(
                s,
                Stage::Quantize { .. } | Stage::Finetune { qat: Some(_), .. }
            )
        });
        match (qat.is_some(), quant) {
            (true, Some(q)) => stages[q] = rec,
            (_, Some(q)) => stages.insert(q, rec),
            (_, None) => stages.push(rec),
        }
        Some(Recipe {
            name: format!("{}+finetune", self.name),
            description: format!("{}; fine-tuned to recover accuracy", self.description),
            stages,
            recovery: None,
        })
    }

    /// Refuses recipes that cannot be run as written.
    fn check(&self) -> Result<()> {
        if self.stages.is_empty() {
            bail!(Input, "recipe: no [[stage]]");
        }
        if let Some(r) = &self.recovery {
            if !matches!(r, Stage::Finetune { .. }) {
                bail!(Input, "recipe: [recovery] must be a finetune stage");
            }
        }
        if let Some(r) = self.recovered() {
            r.check().map_err(|e| e.context("[recovery]"))?;
        }
        let mut quantized = false;
        for (i, s) in self.stages.iter().enumerate() {
            let at = format!("recipe stage {} ({})", i + 1, s.kind());
            if quantized {
                bail!(Input, "{at}: comes after quantization; quantize last");
            }
            match s {
                Stage::Prune { sparsity, .. } if !(0.0..1.0).contains(sparsity) => {
                    bail!(Input, "{at}: sparsity {sparsity} is outside [0, 1)")
                }
                Stage::Prune {
                    per_layer: true,
                    pattern,
                    sparsity,
                    ..
                } => {
                    if pattern != "channels" {
                        bail!(Input, "{at}: per_layer applies to pattern = \"channels\"");
                    }
                    if *sparsity > 0.75 {
                        bail!(Input, "{at}: per_layer shares at most 75% of the channels");
                    }
                }
                Stage::Finetune {
                    lr, epochs, qat, ..
                } => {
                    if !(*lr > 0.0 && lr.is_finite()) || *epochs == 0 {
                        bail!(Input, "{at}: needs lr > 0 and epochs >= 1");
                    }
                    quantized = qat.is_some();
                }
                Stage::Quantize { .. } => quantized = true,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stages_with_defaults() {
        let r = Recipe::parse(
            "name = \"x\"\n[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n\
             [[stage]]\nkind = \"finetune\"\n[[stage]]\nkind = \"quantize\"\n",
        )
        .unwrap();
        assert_eq!(r.stages.len(), 3);
        assert!(matches!(&r.stages[0], Stage::Prune { pattern, .. } if pattern == "unstructured"));
        assert!(matches!(&r.stages[2], Stage::Quantize { calib: 500, .. }));
    }

    #[test]
    fn recovery_replaces_quantization_with_qat_or_runs_before_it() {
        let r = Recipe::parse(
            "name = \"q\"\n[[stage]]\nkind = \"quantize\"\n\
             [recovery]\nkind = \"finetune\"\nqat = \"w8a8\"\n",
        )
        .unwrap();
        let f = r.recovered().unwrap();
        assert_eq!(f.name, "q+finetune");
        assert!(matches!(
            &f.stages[..],
            [Stage::Finetune { qat: Some(_), .. }]
        ));
        let r = Recipe::parse(
            "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n[[stage]]\nkind = \"quantize\"\n\
             [recovery]\nkind = \"finetune\"\n",
        )
        .unwrap();
        let kinds: Vec<&str> = r
            .recovered()
            .unwrap()
            .stages
            .iter()
            .map(Stage::kind)
            .collect();
        assert_eq!(kinds, ["prune", "finetune", "quantize"]);
        let e = Recipe::parse(
            "[[stage]]\nkind = \"quantize\"\n[recovery]\nkind = \"prune\"\nsparsity = 0.1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be a finetune stage"), "{e}");
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        for (text, needle) in [
            (
                "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\nsparsty = 1\n",
                "unknown field",
            ),
            ("[[stage]]\nkind = \"distill\"\n", "unknown variant"),
            ("colour = 1\n", "unknown field"),
            ("name = \"empty\"\n", "no [[stage]]"),
            (
                "[[stage]]\nkind = \"prune\"\nsparsity = 1.5\n",
                "outside [0, 1)",
            ),
            (
                "[[stage]]\nkind = \"prune\"\nsparsity = 0.5\nper_layer = true\n",
                "per_layer applies to pattern = \"channels\"",
            ),
            (
                "[[stage]]\nkind = \"prune\"\npattern = \"channels\"\nsparsity = 0.8\n\
                 per_layer = true\n",
                "at most 75%",
            ),
            (
                "[[stage]]\nkind = \"quantize\"\n[[stage]]\nkind = \"prune\"\nsparsity = 0.5\n",
                "quantize last",
            ),
            ("[[stage]]\nkind = \"prune\"\n", "missing field"),
        ] {
            let e = Recipe::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
