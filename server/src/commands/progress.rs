//! Progress of a long offline command on standard error: a bar on a terminal, a plain line
//! every second otherwise (a log file or journald keeps no bar).

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

/// Progress toward `total` units (entries, bytes), reported under `label`.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: &'static str,
    unit: &'static str,
    total: u64,
    started: Instant,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    /// Progress of `label` toward `total` of `unit` (a plural noun, or `"bytes"`).
    pub fn new(label: &'static str, unit: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = if unit == "bytes" {
                "{bar:40} {bytes}/{total_bytes}  {bytes_per_sec}  eta {eta}".to_string()
            } else {
                format!("{{bar:40}} {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}")
            };
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&template).expect("valid template"),
            );
            bar
        });
        Self {
            bar,
            label,
            unit,
            total,
            started: Instant::now(),
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    /// `done` units of the total are done.
    pub fn update(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if self.last_line.get().elapsed() >= Duration::from_secs(1) {
            self.last_line.set(Instant::now());
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "{}: {done}/{} {}, {rate:.0} {}/s",
                self.label, self.total, self.unit, self.unit
            );
        }
    }

    /// The total is now `total` (a later phase of the work made it known).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// Takes the bar off the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `work` with a progress callback `(done, total)` shown under `label` in `unit`, the
/// display made at the first call (when the total is known; a later call may change it) and
/// cleared at the end.
pub fn observed<T>(
    label: &'static str,
    unit: &'static str,
    work: impl FnOnce(&mut dyn FnMut(u64, u64)) -> T,
) -> T {
    let mut progress: Option<Progress> = None;
    let result = work(&mut |done, total| {
        let p = progress.get_or_insert_with(|| Progress::new(label, unit, total));
        if p.total != total {
            p.set_total(total);
        }
        p.update(done);
    });
    if let Some(p) = &progress {
        p.finish();
    }
    result
}
