//! The jobz job file: parsing, validation and the typed model.
//!
//! Loading happens in two steps (SPEC "The job file"): raw serde types mirror
//! the YAML strictly (unknown keys are errors) and hold no logic; then a typed,
//! validated [`JobFile`] is built once, with every cross-check done. All
//! problems are collected and reported together as [`Diagnostics`], each with
//! file, line and column. Only this crate knows `serde_yaml`.

mod check;
pub mod duration;
pub mod model;
pub mod params;
mod position;
mod raw;
pub mod template;

pub use check::{BUILTINS, FOLLOW_UP_BUILTINS, GATE_BUILTINS, UNIQUE_BUILTINS};
pub use duration::{parse_duration, parse_rate, DurationError, RateError};
pub use model::*;

use std::fmt;
use std::path::Path;

/// The example job file built into the binary: the embedded default when no `jobz.yaml` is found.
pub const EXAMPLE_YAML: &str = include_str!("../example.yaml");

/// Where in a file a problem is (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// One problem found in a job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub location: Location,
    pub message: String,
}

/// Every problem found in one job file, in file order. Displays as
/// `file:line:col: message` lines, the form editors understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics {
    pub origin: String,
    pub problems: Vec<Diagnostic>,
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.origin, d.location.line, d.location.column, d.message)?;
        }
        Ok(())
    }
}

/// Why a job file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(#[from] Diagnostics),
}

/// Reads and validates the job file at `path`.
pub fn load(path: &Path) -> Result<JobFile, LoadError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.display().to_string(), source })?;
    Ok(parse(&path.display().to_string(), &text)?)
}

/// Validates job file text; `origin` names it in diagnostics. On failure returns
/// every problem found, in file order.
pub fn parse(origin: &str, text: &str) -> Result<JobFile, Diagnostics> {
    let positions = position::Positions::index(text);
    let built = match raw::load_value(text) {
        Ok(value) => check::build(origin, value, &positions),
        Err(error) => {
            let mut problems = positions.duplicates.clone();
            problems.push(syntax_problem(&error));
            Err(problems)
        }
    };
    built.map_err(|mut problems| {
        problems.sort_by_key(|p| p.location);
        problems.dedup();
        Diagnostics { origin: origin.to_owned(), problems }
    })
}

/// A YAML syntax error, at serde_yaml's location, without the location repeated in the text.
fn syntax_problem(error: &serde_yaml::Error) -> Diagnostic {
    let location =
        error.location().map_or(Location { line: 1, column: 1 }, |l| Location { line: l.line(), column: l.column() });
    let text = error.to_string();
    let message = match text.split_once(" at line ") {
        Some((head, tail)) => {
            // Drop `N column M` right after " at line ", keep any explanation that follows.
            let rest =
                tail.split_once(" column ").map_or("", |(_, r)| r.trim_start_matches(|c: char| c.is_ascii_digit()));
            format!("{head}{rest}")
        }
        None => text,
    };
    Diagnostic { location, message: format!("invalid YAML: {message}") }
}
