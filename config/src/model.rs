//! The validated job file model: what the rest of jobz works with.
//!
//! Built once from the raw serde types by [`crate::load`]; every value in here
//! has passed its checks (patterns compile, templates name declared params,
//! follow-ups name existing jobs, ...), so callers never re-validate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::template::{CommandTemplate, Template};

/// A whole job file: the jobs, the gates and the front door's tokens.
#[derive(Debug, Clone)]
pub struct JobFile {
    /// Where the file came from (a path, or `<embedded>` for the built-in example).
    pub origin: String,
    pub jobs: BTreeMap<String, JobDef>,
    pub gates: BTreeMap<String, GateDef>,
    /// Who may call the front door (`tokens:`); empty means no token is asked for.
    pub tokens: BTreeMap<String, TokenDef>,
}

/// One job definition.
#[derive(Debug, Clone)]
pub struct JobDef {
    pub name: String,
    /// The command, already split into words (argv mode) or lexed for `/bin/sh -c` (shell mode).
    pub command: CommandTemplate,
    pub params: BTreeMap<String, ParamSpec>,
    /// Extra environment; values may hold placeholders (filled as plain strings, never run).
    pub env: BTreeMap<String, Template>,
    pub cwd: Option<PathBuf>,
    pub mode: Mode,
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub concurrency: Option<u32>,
    pub rate: Option<Rate>,
    /// Queue order: higher runs first; equal priorities stay first-in, first-out.
    pub priority: i32,
    pub unique: Option<Unique>,
    pub before: Option<CommandTemplate>,
    pub after: Option<CommandTemplate>,
    pub on_success: Vec<FollowUp>,
    pub on_failure: Vec<FollowUp>,
    pub schedules: Vec<Schedule>,
    /// The definition's text as the worker and broker hash it for drift detection
    /// (a canonical rendering of the raw YAML node of this job).
    pub canonical: String,
}

/// How a param of a job is checked and defaulted.
#[derive(Debug, Clone, Default)]
pub struct ParamSpec {
    pub required: bool,
    pub default: Option<String>,
    /// Matched against the whole value (the source is anchored when compiled).
    pub pattern: Option<Pattern>,
    pub one_of: Option<Vec<String>>,
}

/// A compiled regular expression that must match a whole value.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// The pattern as written in the job file.
    pub source: String,
    /// The same pattern anchored as `^(?:source)$`.
    pub regex: regex::Regex,
}

impl Pattern {
    /// Whether `value` matches the pattern from its first byte to its last.
    pub fn is_full_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One worker that serves the job runs it.
    #[default]
    Queue,
    /// Every worker that serves the job runs it, one result each.
    Broadcast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Extra attempts after the first one fails (0: no retry).
    pub max: u32,
    /// Delay before the first retry; doubles with each further retry, with jitter.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max: 0, backoff: Duration::from_secs(1) }
    }
}

/// `N/s`, `N/m`, `N/h`: at most `count` dispatches per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

#[derive(Debug, Clone)]
pub struct Unique {
    pub key: Template,
    pub ttl: Duration,
}

/// A job started when another ends (`on_success`, `on_failure`) or when a gate opens.
#[derive(Debug, Clone)]
pub struct FollowUp {
    pub job: String,
    /// Overrides of the inherited params; values are templates over the parent's params.
    pub params: BTreeMap<String, Template>,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub cron: Cron,
    pub timezone: chrono_tz::Tz,
    pub params: BTreeMap<String, String>,
    pub catch_up: CatchUp,
}

/// A parsed cron expression (five fields, or six with seconds) and its source text.
#[derive(Debug, Clone)]
pub struct Cron {
    pub source: String,
    pub pattern: croner::Cron,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// After downtime, the latest missed instant runs once.
    #[default]
    Latest,
    /// After downtime, missed instants are skipped.
    None,
}

/// A fan-in gate.
#[derive(Debug, Clone)]
pub struct GateDef {
    pub name: String,
    /// Upstream job names.
    pub after: Vec<String>,
    /// Successes needed per key of each job in `after`; `None` means one of each.
    pub count: Option<u32>,
    /// Groups upstream successes; `None` means the run id.
    pub key: Option<Template>,
    pub then: FollowUp,
    pub timeout: Option<Duration>,
    pub on_timeout: Option<FollowUp>,
    pub on_failure: Option<FollowUp>,
}

/// One token of the front door (`tokens:`): the file holds only its SHA-256,
/// never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDef {
    /// The entry's name: shown in the broker's log and in 403 answers, never the token.
    pub name: String,
    /// SHA-256 of the token's text (`hash: "sha256:HEX"`).
    pub sha256: [u8; 32],
    pub scopes: Scopes,
}

/// What a token may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    /// `start` (any job) or `start: [a, b]` (only those); `None` without it.
    pub start: Option<StartScope>,
    /// `read`: every `GET` (jobs, logs, workers, gates, schedules, metrics).
    pub read: bool,
    /// `admin`: cancel and retry jobs, cancel runs.
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartScope {
    Any,
    /// Only these job names.
    Only(std::collections::BTreeSet<String>),
}

impl StartScope {
    pub fn allows(&self, job_name: &str) -> bool {
        match self {
            StartScope::Any => true,
            StartScope::Only(names) => names.contains(job_name),
        }
    }
}
