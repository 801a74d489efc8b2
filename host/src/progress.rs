//! Progress of long work: a bar on a terminal; plain lines otherwise (a log
//! file, CI), never carriage returns or escape codes.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// The stage in progress: its bar (in text bytes), name, documents so far,
/// start time.
type StageBar = (ProgressBar, String, u64, Instant);

pub struct PrepareProgress {
    bar_enabled: bool,
    current: Mutex<Option<StageBar>>,
}

impl PrepareProgress {
    pub fn new(disable_tqdm: bool) -> Self {
        Self {
            bar_enabled: !disable_tqdm && std::io::stderr().is_terminal(),
            current: Mutex::new(None),
        }
    }
}

/// Progress in bytes of text, which the time taken follows (documents vary
/// in length), with an ETA; the first stage (`read`) counts the corpus's
/// documents, the others run them through plugins and the tokenizer.
impl pt_data::Progress for PrepareProgress {
    fn start(&self, stage: &str, bytes: u64) {
        let bar = if self.bar_enabled {
            ProgressBar::new(bytes)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}  {msg} docs  {elapsed} (eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        *self.current.lock().unwrap() = Some((bar, stage.to_string(), 0, Instant::now()));
    }

    fn advance(&self, documents: u64, bytes: u64) {
        if let Some((bar, _, done, _)) = &mut *self.current.lock().unwrap() {
            *done += documents;
            bar.inc(bytes);
            bar.set_message(done.to_string());
        }
    }

    fn finish(&self) {
        if let Some((bar, stage, documents, started)) = self.current.lock().unwrap().take() {
            let bytes = bar.position();
            bar.finish_and_clear();
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "{stage}: {documents} documents, {:.1} MB in {seconds:.2} s ({:.0} documents/s, {:.1} MB/s)",
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

/// How often training prints a progress line when stderr is not a terminal.
const PLAIN_INTERVAL: Duration = Duration::from_secs(30);

/// Progress of training: a bar with step, loss, learning rate, tokens/s and
/// ETA on a terminal; otherwise a line at the first step, every 30 s and at
/// the last step.
pub struct TrainProgress {
    bar: ProgressBar,
    plain: bool,
    last_line: Option<Instant>,
    /// The first step this run reported, and when: the ETA's base (a resumed
    /// run starts past zero; evaluation before it does not count).
    first: Option<(usize, Instant)>,
}

impl TrainProgress {
    pub fn new(disable_tqdm: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if !disable_tqdm && terminal {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("train [{bar:16}] {pos}/{len} {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self {
            bar,
            plain: !disable_tqdm && !terminal,
            last_line: None,
            first: None,
        }
    }

    /// Runs `print` without the bar in the way.
    pub fn suspend(&self, print: impl FnOnce()) {
        self.bar.suspend(print);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Evaluation batches, shown in the bar's message (the step stays put).
    pub fn eval_batch(&mut self, done: usize, total: usize) {
        self.bar
            .set_message(format!("evaluating: batch {done}/{total}"));
        // The evaluation's result line follows; a long one gets lines meanwhile.
        if self.plain && self.line_due() {
            eprintln!("eval: batch {done}/{total}");
        }
    }

    /// Whether a plain line is due (and, if so, resets the clock).
    fn line_due(&mut self) -> bool {
        let due = self
            .last_line
            .is_none_or(|at| at.elapsed() >= PLAIN_INTERVAL);
        if due {
            self.last_line = Some(Instant::now());
        }
        due
    }

    pub fn step(&mut self, progress: &pt_train::trainer::StepProgress) {
        let summary = format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            progress.loss, progress.learning_rate, progress.tokens_per_second
        );
        let (first_step, started) = *self.first.get_or_insert((progress.step, Instant::now()));
        self.bar.set_length(progress.max_steps as u64);
        self.bar.set_position(progress.step as u64);
        self.bar.set_message(summary.clone());
        if self.plain && (self.line_due() || progress.step == progress.max_steps) {
            let elapsed = started.elapsed();
            let done = progress.step - first_step;
            let left = progress.max_steps.saturating_sub(progress.step);
            let eta = if done == 0 {
                "?".to_string()
            } else {
                let seconds = elapsed.as_secs_f64() / done as f64 * left as f64;
                indicatif::HumanDuration(Duration::from_secs_f64(seconds)).to_string()
            };
            eprintln!(
                "train: step {}/{}  {summary}  eta {eta}",
                progress.step, progress.max_steps,
            );
        }
    }
}
