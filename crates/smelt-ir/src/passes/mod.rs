//! Graph passes that need no evaluation. Each is a [`crate::Pass`] with a name and a test.

mod dynamic_batch;

pub use dynamic_batch::DynamicBatch;
