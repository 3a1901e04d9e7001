//! How a transfer reports its progress: [`Progress`], with [`NoProgress`] for callers that
//! want none and [`BarProgress`] for a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Told how a transfer advances. Called from the transfer's task, so implementations must be
/// quick; they need not be exact about the rate at which they are called.
pub trait Progress: Send + Sync {
    /// The transfer of `name`, `total` bytes long, begins.
    fn start(&self, name: &str, total: u64);
    /// `done` bytes of the content have been handed over (sender: to QUIC, receiver: to disk).
    fn advance(&self, done: u64);
    /// The transfer is over, successfully.
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _name: &str, _total: u64) {}
    fn advance(&self, _done: u64) {}
    fn finish(&self) {}
}

/// A progress bar on standard error: name, bytes done and total, rate and time left. Draws
/// nothing when standard error is not a terminal, so logs and pipes stay clean.
#[derive(Debug)]
pub struct BarProgress {
    bar: ProgressBar,
}

impl BarProgress {
    /// A bar on standard error, hidden unless it is a terminal.
    pub fn new() -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Self { bar }
    }

    /// Whether the bar draws anything (standard error is a terminal).
    pub fn is_visible(&self) -> bool {
        !self.bar.is_hidden()
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for BarProgress {
    fn start(&self, name: &str, total: u64) {
        self.bar.set_length(total);
        self.bar.set_message(name.to_owned());
        self.bar.set_position(0);
        self.bar.reset_eta();
    }

    fn advance(&self, done: u64) {
        self.bar.set_position(done);
    }

    fn finish(&self) {
        self.bar.finish();
    }
}
