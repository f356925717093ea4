//! Progress of long work (restore, a secondary's bootstrap, hydration,
//! migration, merge): a bar on a terminal, log lines elsewhere.
//!
//! On a terminal (`membridge restore`, or the daemon run with `--foreground`)
//! an indicatif bar is drawn on stderr. Otherwise, as in the background
//! daemon whose stderr is its log file, one `info` line is logged each time
//! another 10% is done, at most one a second, so quick work logs nothing and
//! long work shows it is moving.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Log a line each time this much more is done...
const LOG_STEP_PERCENT: u64 = 10;
/// ...but no more often than this.
const LOG_MIN_INTERVAL: Duration = Duration::from_secs(1);

pub struct Progress {
    bar: Option<ProgressBar>,
    log: Option<Mutex<LogState>>,
}

struct LogState {
    what: String,
    total: u64,
    done: u64,
    /// The last percentage step logged.
    step: u64,
    last: Instant,
    logged: bool,
    min_interval: Duration,
    /// What `done` and `total` count ("bytes", "rows").
    unit: &'static str,
}

impl Progress {
    /// A progress of `total` bytes (or units) of `what`. `enabled: false`
    /// shows nothing; otherwise a bar on a terminal, log lines elsewhere.
    pub fn new(enabled: bool, total: u64, what: impl Into<String>) -> Progress {
        Progress::counting(enabled, total, what, "bytes")
    }

    /// Like [`Progress::new`] for work counted in other units (`"rows"`).
    pub fn counting(
        enabled: bool,
        total: u64,
        what: impl Into<String>,
        unit: &'static str,
    ) -> Progress {
        let what = what.into();
        if !enabled {
            return Progress::hidden();
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = match unit {
                "bytes" => {
                    "{msg} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}".into()
                }
                _ => format!("{{msg}} [{{bar:32}}] {{pos}}/{{len}} {unit} eta {{eta}}"),
            };
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what);
            return Progress {
                bar: Some(bar),
                log: None,
            };
        }
        Progress::logging(total, what, LOG_MIN_INTERVAL, unit)
    }

    pub fn hidden() -> Progress {
        Progress {
            bar: None,
            log: None,
        }
    }

    fn logging(total: u64, what: String, min_interval: Duration, unit: &'static str) -> Progress {
        Progress {
            bar: None,
            log: Some(Mutex::new(LogState {
                what,
                total,
                done: 0,
                step: 0,
                last: Instant::now(),
                logged: false,
                min_interval,
                unit,
            })),
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        if let Some(log) = &self.log {
            let mut s = log.lock().unwrap();
            s.done += n;
            if let Some(line) = s.step_line() {
                tracing::info!("{line}");
            }
        }
    }

    /// Work done: the bar is cleared; in log mode a last line says so if
    /// any line was logged before.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some(log) = &self.log {
            let s = log.lock().unwrap();
            if s.logged {
                tracing::info!("{}: done ({} {})", s.what, s.done, s.unit);
            }
        }
    }
}

impl LogState {
    /// The line to log now, if another step was reached and enough time passed.
    fn step_line(&mut self) -> Option<String> {
        if self.total == 0 {
            return None;
        }
        let pct =
            (self.done.min(self.total) * 100 / self.total) / LOG_STEP_PERCENT * LOG_STEP_PERCENT;
        if pct <= self.step || pct >= 100 || self.last.elapsed() < self.min_interval {
            return None;
        }
        self.step = pct;
        self.last = Instant::now();
        self.logged = true;
        Some(format!(
            "{}: {pct}% ({} of {} {})",
            self.what, self.done, self.total, self.unit
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Progress, incs: &[u64]) -> Vec<String> {
        let mut out = Vec::new();
        for n in incs {
            let mut s = p.log.as_ref().unwrap().lock().unwrap();
            s.done += n;
            out.extend(s.step_line());
        }
        out
    }

    #[test]
    fn logs_each_ten_percent_step_once() {
        let p = Progress::logging(1000, "restoring x".into(), Duration::ZERO, "bytes");
        let got = lines(&p, &[50, 60, 5, 300, 585]);
        assert_eq!(
            got,
            [
                "restoring x: 10% (110 of 1000 bytes)",
                "restoring x: 40% (415 of 1000 bytes)"
            ]
        );
    }

    #[test]
    fn quick_work_logs_nothing() {
        let p = Progress::logging(1000, "x".into(), Duration::from_secs(3600), "rows");
        assert!(lines(&p, &[500, 500]).is_empty());
        let p = Progress::logging(0, "x".into(), Duration::ZERO, "rows");
        assert!(lines(&p, &[5]).is_empty());
    }
}
