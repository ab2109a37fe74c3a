//! Progress bars on stderr (indicatif), one line per stage (an epoch, a calibration pass).
//! Drawn only on a terminal and never with --json, so scripts and tests see clean output.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    quiet: bool,
    bar: Option<(String, ProgressBar)>,
}

impl Progress {
    pub fn new(json: bool) -> Progress {
        Progress {
            quiet: json,
            bar: None,
        }
    }

    /// `done` of `total` steps of `stage`, with a note (a loss, a throughput).
    pub fn update(&mut self, stage: &str, done: usize, total: usize, msg: String) {
        if self.quiet {
            return;
        }
        if self.bar.as_ref().is_none_or(|(s, _)| s != stage) {
            if let Some((_, old)) = self.bar.take() {
                old.finish();
            }
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(stage.to_string());
            self.bar = Some((stage.to_string(), b));
        }
        if let Some((_, b)) = &self.bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
            b.set_message(msg);
        }
    }

    pub fn finish(self) {
        if let Some((_, b)) = self.bar {
            b.finish();
        }
    }
}
