//! Graph passes that need no evaluation. Each is a [`crate::Pass`] with a name and a test.

mod compact_names;
mod dynamic_batch;
mod fuse_bias;
mod upgrade_opset;

pub use compact_names::CompactNames;
pub use dynamic_batch::DynamicBatch;
pub use fuse_bias::FuseBias;
pub use upgrade_opset::{UpgradeOpset, MAX_KNOWN_OPSET};
