//! The loading progress bar: the model crate reports `(bytes done, bytes total)` and
//! this draws it with indicatif, on stderr, for loads of 256 MiB or more (hidden when
//! stderr is not a terminal: indicatif's own rule).

use indicatif::{ProgressBar, ProgressStyle};

/// Smaller loads finish before a bar is worth drawing.
const MIN_BYTES: u64 = 256 << 20;

/// A bar labelled `what`, drawn from the first report of a large enough load;
/// [`LoadBar::report`] is the model crate's progress callback.
pub struct LoadBar {
    bar: std::cell::OnceCell<ProgressBar>,
    what: &'static str,
}

impl LoadBar {
    pub fn new(what: &'static str) -> LoadBar {
        LoadBar {
            bar: std::cell::OnceCell::new(),
            what,
        }
    }

    /// Called by the loader with the bytes read so far and the total.
    pub fn report(&self, done: u64, total: u64) {
        if total < MIN_BYTES {
            return;
        }
        let bar = self.bar.get_or_init(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "loading {msg} {bar:40} {binary_bytes}/{binary_total_bytes} ({eta})",
            ) {
                bar.set_style(style);
            }
            bar.set_message(self.what);
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
    }
}

impl Drop for LoadBar {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}
