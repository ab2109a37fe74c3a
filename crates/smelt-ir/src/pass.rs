use crate::{Model, Result};

/// What a pass did, for the manifest and the report. Passes never print.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassRecord {
    pub pass: String,
    /// One human-readable line per change (e.g. "folded node Reshape_3 into a constant").
    pub changes: Vec<String>,
}

impl PassRecord {
    pub fn new(pass: &str) -> Self {
        PassRecord {
            pass: pass.to_string(),
            changes: Vec::new(),
        }
    }
    pub fn note(&mut self, line: impl Into<String>) {
        self.changes.push(line.into());
    }
}

/// A named graph-to-graph transformation.
pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, model: Model) -> Result<(Model, PassRecord)>;
}
