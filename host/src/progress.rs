//! Progress of `prepare`: a bar on a terminal, one line per split otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// The bar of the split in progress, its name, document and byte totals, start time.
type SplitBar = (ProgressBar, String, u64, u64, Instant);

pub struct PrepareProgress {
    bar_enabled: bool,
    current: Mutex<Option<SplitBar>>,
}

impl PrepareProgress {
    pub fn new(disable_tqdm: bool) -> Self {
        Self {
            bar_enabled: !disable_tqdm && std::io::stderr().is_terminal(),
            current: Mutex::new(None),
        }
    }
}

impl pt_data::Progress for PrepareProgress {
    fn start(&self, split: &str, documents: u64, bytes: u64) {
        let bar = if self.bar_enabled {
            ProgressBar::new(documents)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} docs  {msg}  {elapsed} (eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(split.to_string());
        *self.current.lock().unwrap() =
            Some((bar, split.to_string(), documents, bytes, Instant::now()));
    }

    fn advance(&self, documents: u64, _bytes: u64) {
        if let Some((bar, _, total, bytes, started)) = &*self.current.lock().unwrap() {
            bar.inc(documents);
            let fraction = bar.position() as f64 / (*total).max(1) as f64;
            let rate = *bytes as f64 * fraction / started.elapsed().as_secs_f64().max(1e-9) / 1e6;
            bar.set_message(format!("{rate:.1} MB/s"));
        }
    }

    fn finish(&self) {
        if let Some((bar, split, documents, bytes, started)) = self.current.lock().unwrap().take() {
            bar.finish_and_clear();
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "{split}: {documents} documents, {:.1} MB in {seconds:.2} s ({:.0} documents/s, {:.1} MB/s)",
                bytes as f64 / 1e6,
                documents as f64 / seconds.max(1e-9),
                bytes as f64 / 1e6 / seconds.max(1e-9)
            );
        }
    }
}

/// Progress of a model download: a byte bar per file on a terminal, a line
/// per file otherwise.
pub struct DownloadProgress {
    bar_enabled: bool,
    bar: Mutex<ProgressBar>,
}

impl DownloadProgress {
    pub fn new(disable_tqdm: bool) -> Self {
        Self {
            bar_enabled: !disable_tqdm && std::io::stderr().is_terminal(),
            bar: Mutex::new(ProgressBar::hidden()),
        }
    }
}

impl pt_hub::DownloadProgress for DownloadProgress {
    fn start(&self, file: &str, total: Option<u64>, resumed: u64) {
        let resuming = if resumed > 0 {
            format!(", resuming at {:.1} MB", resumed as f64 / 1e6)
        } else {
            String::new()
        };
        if !self.bar_enabled {
            let size = total.map_or("size unknown".into(), |t| {
                format!("{:.1} MB", t as f64 / 1e6)
            });
            eprintln!("downloading {file} ({size}{resuming})");
            return;
        }
        let bar = ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(file.to_string());
        bar.set_position(resumed);
        *self.bar.lock().expect("progress lock") = bar;
    }

    fn advance(&self, bytes: u64) {
        self.bar.lock().expect("progress lock").inc(bytes);
    }

    fn finish(&self, file: &str) {
        self.bar.lock().expect("progress lock").finish_and_clear();
        eprintln!("downloaded {file}");
    }

    fn retry(&self, file: &str, error: &str) {
        self.bar.lock().expect("progress lock").suspend(|| {
            eprintln!("warning: {file}: {error}");
        });
    }
}
