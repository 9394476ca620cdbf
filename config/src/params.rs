//! Checks the params of a start request against a job's declared params.
//!
//! SPEC: declared params only, the `pattern` (full match) or `one_of` list, no
//! NUL or other control characters, at most 4 KiB; defaults fill in, required
//! params must be given. Every problem is reported, not just the first.

use std::collections::BTreeMap;

use crate::model::{JobDef, ParamSpec};

/// Names that cannot be params: `job_name` and `wait` (SPEC), start options, and the built-in placeholders.
pub const RESERVED_NAMES: &[&str] =
    &["job_name", "wait", "priority", "job_id", "run_id", "attempt", "exit_code", "gate", "key"];

/// The largest value a param may have, in bytes.
pub const VALUE_MAX_BYTES: usize = 4096;

/// One param that failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("param {param:?}: {problem}")]
pub struct ParamError {
    pub param: String,
    pub problem: ParamProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamProblem {
    #[error("not declared by the job")]
    Undeclared,
    #[error("required and not given")]
    Missing,
    #[error("does not match the pattern `{pattern}`")]
    PatternMismatch { pattern: String },
    #[error("must be one of {allowed:?}")]
    NotOneOf { allowed: Vec<String> },
    #[error("contains the control character U+{code:04X} at byte {index}")]
    ControlCharacter { index: usize, code: u32 },
    #[error("is {len} bytes long, more than the limit of {VALUE_MAX_BYTES}")]
    TooLong { len: usize },
}

/// Checks `given` against `job`'s params and returns the full set: given values plus defaults.
/// On failure returns every problem found, sorted by param name (one problem per param: the
/// first of length, control characters, `one_of`, `pattern`).
pub fn validate(job: &JobDef, given: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, Vec<ParamError>> {
    let mut errors = Vec::new();
    let mut params = BTreeMap::new();
    for (name, value) in given {
        let problem = match job.params.get(name) {
            None => Some(ParamProblem::Undeclared),
            Some(spec) => check(spec, value),
        };
        match problem {
            Some(problem) => errors.push(ParamError { param: name.clone(), problem }),
            None => {
                params.insert(name.clone(), value.clone());
            }
        }
    }
    for (name, spec) in job.params.iter().filter(|(name, _)| !given.contains_key(*name)) {
        match (&spec.default, spec.required) {
            (Some(default), _) => {
                params.insert(name.clone(), default.clone());
            }
            (None, true) => errors.push(ParamError { param: name.clone(), problem: ParamProblem::Missing }),
            (None, false) => {}
        }
    }
    if errors.is_empty() {
        return Ok(params);
    }
    // Both loops walk sorted maps, but they interleave; a stable sort keeps it simple.
    errors.sort_by(|a, b| a.param.cmp(&b.param));
    Err(errors)
}

/// The first problem with one declared param's value. Length goes first so that an oversized
/// value is never handed to the regex.
fn check(spec: &ParamSpec, value: &str) -> Option<ParamProblem> {
    if value.len() > VALUE_MAX_BYTES {
        return Some(ParamProblem::TooLong { len: value.len() });
    }
    // `char::is_control` covers NUL, newline, tab, DEL and the C1 range: none belongs in a
    // value that ends up in argv, a script or a log line.
    if let Some((index, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Some(ParamProblem::ControlCharacter { index, code: u32::from(c) });
    }
    if let Some(allowed) = spec.one_of.as_ref().filter(|allowed| !allowed.iter().any(|a| a == value)) {
        return Some(ParamProblem::NotOneOf { allowed: allowed.clone() });
    }
    match &spec.pattern {
        Some(pattern) if !pattern.is_full_match(value) => {
            Some(ParamProblem::PatternMismatch { pattern: pattern.source.clone() })
        }
        _ => None,
    }
}

/// Keeps only the params that `job` declares (a follow-up drops what its target does not declare).
pub fn retain_declared(job: &JobDef, params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    params.iter().filter(|(k, _)| job.params.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}
