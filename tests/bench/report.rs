//! Markdown tables: medians with [min–max] over the repetitions, and each
//! figure's ratio to nginx, to haproxy (tokenproxy's) and to direct.

use crate::common::{median_min_max, Sample};
use std::fmt::Write as _;

/// A difference, always signed.
pub fn signed(v: f64) -> String {
    if v.is_nan() || v < 0.0 {
        num(v).replace('-', "−")
    } else {
        format!("+{}", num(v))
    }
}

/// Formats a figure: no decimals from 100 up, one below.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        "–".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

pub fn mmm((m, lo, hi): (f64, f64, f64)) -> String {
    if m.is_nan() {
        "–".to_owned()
    } else if lo == hi {
        num(m)
    } else {
        format!("{} [{}–{}]", num(m), num(lo), num(hi))
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "–".to_owned()
    } else {
        format!("{:.2}×", a / b)
    }
}

type Field = fn(&Sample) -> f64;

const COLUMNS: [(&str, Field); 6] = [
    ("req/s", |s| s.rps),
    ("p50 µs", |s| s.p50_us),
    ("p99 µs", |s| s.p99_us),
    ("p99.9 µs", |s| s.p999_us),
    ("CPU µs/req", |s| s.cpu_us_per_req),
    ("peak RSS KiB", |s| {
        if s.rss_kib == 0 {
            f64::NAN
        } else {
            s.rss_kib as f64
        }
    }),
];

/// The samples of one scenario, per target (`direct`, `tokenproxy`,
/// `nginx`, `haproxy`), in run order.
pub struct Table {
    pub title: String,
    pub targets: Vec<(&'static str, Vec<Sample>)>,
    pub notes: Vec<String>,
}

impl Table {
    pub fn samples(&self, target: &str) -> Option<&[Sample]> {
        self.targets
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, s)| s.as_slice())
    }

    /// Median, min, max of a figure for a target (NaN if absent).
    pub fn stat(&self, target: &str, f: Field) -> (f64, f64, f64) {
        median_min_max(
            self.samples(target)
                .unwrap_or_default()
                .iter()
                .map(f)
                .filter(|v| !v.is_nan())
                .collect(),
        )
    }

    pub fn median(&self, target: &str, f: Field) -> f64 {
        self.stat(target, f).0
    }

    pub fn render(&self, reps: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n### {} ({reps} reps, medians [min–max])\n",
            self.title
        );
        let _ = write!(out, "| target |");
        for (c, _) in COLUMNS {
            let _ = write!(out, " {c} |");
        }
        let _ = writeln!(out, " errors | non-2xx |");
        let _ = writeln!(out, "|---{}|---|---|", "|---".repeat(COLUMNS.len()));
        for (name, samples) in &self.targets {
            let _ = write!(out, "| {name} |");
            for (c, f) in COLUMNS {
                let cell = if c == "peak RSS KiB" {
                    // The peak over the reps, not a median of peaks.
                    num(self.stat(name, f).2)
                } else {
                    mmm(self.stat(name, f))
                };
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(
                out,
                " {} | {} |",
                samples.iter().map(|s| s.errors).sum::<u64>(),
                samples.iter().map(|s| s.non_2xx).sum::<u64>()
            );
        }
        let has = |t: &str| self.samples(t).is_some();
        for (name, _) in &self.targets {
            for base in ["nginx", "haproxy", "direct"] {
                // haproxy ÷ nginx, but not its inverse.
                if *name == base
                    || *name == "direct"
                    || !has(base)
                    || (base == "haproxy" && *name != "tokenproxy")
                {
                    continue;
                }
                let _ = write!(out, "| {name} ÷ {base} |");
                for (c, f) in COLUMNS {
                    let cell = if base == "direct" && (c == "CPU µs/req" || c == "peak RSS KiB") {
                        "–".to_owned()
                    } else {
                        ratio(self.median(name, f), self.median(base, f))
                    };
                    let _ = write!(out, " {cell} |");
                }
                let _ = writeln!(out, " | |");
            }
        }
        if has("direct") {
            let mut line = String::from("\nadded latency vs direct (medians, p50 / p99 / p99.9):");
            for (name, _) in self.targets.iter().filter(|(n, _)| *n != "direct") {
                let add = |f: Field| self.median(name, f) - self.median("direct", f);
                let _ = write!(
                    line,
                    " {name} {} / {} / {} µs;",
                    signed(add(|s| s.p50_us)),
                    signed(add(|s| s.p99_us)),
                    signed(add(|s| s.p999_us))
                );
            }
            line.pop();
            let _ = writeln!(out, "{line}");
        }
        for n in &self.notes {
            let _ = writeln!(out, "\n{n}");
        }
        out
    }
}
