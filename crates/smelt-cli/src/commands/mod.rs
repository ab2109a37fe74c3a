//! One file per subcommand: flags, the library calls, and the printed summary.

pub mod bench;
pub mod compress;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod finetune;
pub mod inspect;
pub mod prune;
pub mod quantize;
pub mod run;
