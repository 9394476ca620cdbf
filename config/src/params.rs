//! Checks the params of a start request against a job's declared params.
//!
//! SPEC: declared params only, the `pattern` (full match) or `one_of` list, no
//! NUL or other control characters, at most 4 KiB; defaults fill in, required
//! params must be given. Every problem is reported, not just the first.

use std::collections::BTreeMap;

use crate::model::JobDef;

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
    #[error("does not match the pattern {pattern:?}")]
    PatternMismatch { pattern: String },
    #[error("must be one of {allowed:?}")]
    NotOneOf { allowed: Vec<String> },
    #[error("contains a control character (byte {index})")]
    ControlCharacter { index: usize },
    #[error("is {len} bytes long, more than the limit of {VALUE_MAX_BYTES}")]
    TooLong { len: usize },
}

/// Checks `given` against `job`'s params and returns the full set: given values plus defaults.
/// On failure returns every problem found, sorted by param name.
pub fn validate(job: &JobDef, given: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, Vec<ParamError>> {
    let _ = (job, given);
    todo!()
}

/// Keeps only the params that `job` declares (a follow-up drops what its target does not declare).
pub fn retain_declared(job: &JobDef, params: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    params.iter().filter(|(k, _)| job.params.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}
