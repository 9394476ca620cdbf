//! [`HttpMetrics`]: requests answered by the front door, counted by status code.
//!
//! Lock-free (one atomic per possible code) because every request touches it.
//! `GET /metrics` appends [`HttpMetrics::render`] to the broker's own text, so
//! the broker's `metrics()` must not include it a second time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;

/// The lowest and highest status codes HTTP defines; `StatusCode` holds nothing outside them.
const CODE_FIRST: u16 = 100;
const CODE_LAST: u16 = 999;
const CODES: usize = (CODE_LAST - CODE_FIRST + 1) as usize;

/// Request counters by status code. Share it with `Arc`; see [`super::HttpOptions::metrics`].
pub struct HttpMetrics {
    by_code: Box<[AtomicU64]>,
}

impl HttpMetrics {
    pub fn new() -> HttpMetrics {
        HttpMetrics { by_code: (0..CODES).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Counts one answered request.
    pub fn record(&self, code: StatusCode) {
        if let Some(counter) = self.slot(code.as_u16()) {
            // Relaxed: each counter is independent and only ever read for display.
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests answered with `code` so far.
    pub fn count(&self, code: u16) -> u64 {
        self.slot(code).map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    /// The counters as Prometheus text: `jobz_http_requests_total{code="202"} 3`, one
    /// line per code seen so far, in code order.
    pub fn render(&self) -> String {
        let mut text = String::from(
            "# HELP jobz_http_requests_total HTTP requests answered by the front door, by status code.\n\
             # TYPE jobz_http_requests_total counter\n",
        );
        for (code, counter) in (CODE_FIRST..=CODE_LAST).zip(self.by_code.iter()) {
            let n = counter.load(Ordering::Relaxed);
            if n > 0 {
                // Writing to a String cannot fail.
                let _ = writeln!(text, "jobz_http_requests_total{{code=\"{code}\"}} {n}");
            }
        }
        text
    }

    fn slot(&self, code: u16) -> Option<&AtomicU64> {
        self.by_code.get(usize::from(code.checked_sub(CODE_FIRST)?))
    }
}

impl Default for HttpMetrics {
    fn default() -> HttpMetrics {
        HttpMetrics::new()
    }
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_code_and_renders_only_codes_seen() {
        let metrics = HttpMetrics::new();
        metrics.record(StatusCode::ACCEPTED);
        metrics.record(StatusCode::ACCEPTED);
        metrics.record(StatusCode::NOT_FOUND);
        assert_eq!(metrics.count(202), 2);
        assert_eq!(metrics.count(404), 1);
        assert_eq!(metrics.count(200), 0);
        assert_eq!(metrics.count(5), 0);
        let text = metrics.render();
        assert!(text.contains("jobz_http_requests_total{code=\"202\"} 2\n"), "{text}");
        assert!(text.contains("jobz_http_requests_total{code=\"404\"} 1\n"), "{text}");
        assert!(!text.contains("code=\"200\""), "{text}");
        assert!(text.find("\"202\"") < text.find("\"404\""));
    }
}
