//! Compression as one run: a recipe of stages applied in order, the model measured before
//! and after, and a report that proves (or disproves) each gain.

pub mod ablation;
pub mod measure;
pub mod pipeline;
pub mod recipe;
pub mod report;
pub mod search;

pub use recipe::{Recipe, Stage};
