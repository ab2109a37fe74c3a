//! Graph passes that need no evaluation. Each is a [`crate::Pass`] with a name and a test.

mod dynamic_batch;
mod fuse_bias;
mod upgrade_opset;

pub use dynamic_batch::DynamicBatch;
pub use fuse_bias::FuseBias;
pub use upgrade_opset::{UpgradeOpset, MAX_KNOWN_OPSET};
