//! Builds the validated [`JobFile`] from the raw YAML, collecting every problem.
//!
//! The second of the two loading steps (STYLE "Config in two steps"). Each job
//! and gate is read and converted on its own, always producing a best-effort
//! model so that the cross-checks (follow-ups, gates, cycles) can still run and
//! report their problems too. Every problem is located at the node it is about,
//! through the position index, and nothing is returned unless there are none.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::duration::{parse_duration, parse_rate};
use crate::model::*;
use crate::params::{self, RESERVED_NAMES};
use crate::position::{NodePath, Positions};
use crate::raw::{
    self, dotted, key_text, OneOrMany, RawFile, RawFollowUp, RawGate, RawJob, RawParam, RawScope, RawToken, Scalar,
};
use crate::template::{CommandTemplate, Template};
use crate::{Diagnostic, Location};

/// Placeholders every job template may use besides the job's params.
pub const BUILTINS: &[&str] = &["job_id", "job_name", "run_id", "attempt"];
/// The extra placeholder of `on_success`/`on_failure` param values.
pub const FOLLOW_UP_BUILTINS: &[&str] = &["exit_code"];
/// Placeholders of a gate's follow-up params, besides the upstream jobs' params.
pub const GATE_BUILTINS: &[&str] = &["run_id", "gate", "key"];
/// The built-ins a `unique` key may use besides the job's params: those known
/// before the job exists. `{job_id}` would make every key different and
/// `{attempt}` is always 1 at a start, so both are refused there.
pub const UNIQUE_BUILTINS: &[&str] = &["job_name", "run_id"];
/// How long a `unique` key holds when the job file gives no `ttl`.
const UNIQUE_TTL_DEFAULT: Duration = Duration::from_secs(24 * 3600);
const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1000..=1000;

/// A reserved name that no placeholder site defines (`wait`, `priority`): it
/// can be neither a param nor a built-in anywhere.
fn reserved_only(name: &str) -> bool {
    RESERVED_NAMES.contains(&name)
        && ![BUILTINS, FOLLOW_UP_BUILTINS, GATE_BUILTINS, UNIQUE_BUILTINS].iter().any(|b| b.contains(&name))
}

/// Checks the parsed file and builds the model, or returns every problem found.
pub(crate) fn build(origin: &str, mut value: Value, positions: &Positions) -> Result<JobFile, Vec<Diagnostic>> {
    let mut checker = Checker { positions, problems: positions.duplicates.clone() };
    if let Err(error) = value.apply_merge() {
        let at = positions.keys_named("<<").first().copied().unwrap_or(Location { line: 1, column: 1 });
        checker.problems.push(Diagnostic { location: at, message: format!("cannot merge with `<<`: {error}") });
    }
    if !value.is_mapping() {
        let what = if value.is_null() { "the file is empty" } else { "the file is not a mapping" };
        checker.at_value(&[], format!("{what}: it needs a `jobs:` mapping with at least one job"));
        return Err(checker.problems);
    }
    let Some(file) = checker.read::<RawFile>(&value, &[]) else {
        return Err(checker.problems);
    };
    let jobs = checker.entries(file.jobs.as_ref(), "jobs");
    let gates = checker.entries(file.gates.as_ref(), "gates");
    let tokens = checker.entries(file.tokens.as_ref(), "tokens");
    // A `jobs:` that is not a mapping was reported as such when the file was read.
    let jobs_mistyped = value.get("jobs").is_some_and(|v| !v.is_mapping() && !v.is_null());
    if jobs.is_empty() && !jobs_mistyped {
        checker.at_key(&path(&[], &["jobs"]), "the file defines no jobs: add at least one under `jobs:`");
    }

    let mut model =
        JobFile { origin: origin.to_owned(), jobs: BTreeMap::new(), gates: BTreeMap::new(), tokens: BTreeMap::new() };
    // Jobs that could not be read at all: references to them are not reported again.
    let mut unreadable = BTreeSet::new();
    let mut sites = Vec::new();
    for (name, job_path, node) in &jobs {
        checker.check_name(job_path, "job", name);
        match checker.read::<RawJob>(node, job_path) {
            Some(raw) => {
                let job = checker.job(name, job_path, &raw, canonical(node), &mut sites);
                model.jobs.insert(name.clone(), job);
            }
            None => {
                unreadable.insert(name.clone());
            }
        }
    }
    let mut gate_sites = Vec::new();
    for (name, gate_path, node) in &gates {
        checker.check_name(gate_path, "gate", name);
        if let Some(raw) = checker.read::<RawGate>(node, gate_path) {
            let gate = checker.gate(name, gate_path, &raw, &model.jobs, &unreadable, &mut gate_sites);
            model.gates.insert(name.clone(), gate);
        }
    }
    sites.extend(gate_sites);
    for site in &sites {
        checker.follow_up(site, &model, &unreadable);
    }
    checker.cycles(&sites, &model);
    // Which hash each token has, to refuse a second entry with the same one.
    let mut hashes: BTreeMap<[u8; 32], String> = BTreeMap::new();
    for (name, token_path, node) in &tokens {
        checker.check_name(token_path, "token", name);
        if let Some(raw) = checker.read::<RawToken>(node, token_path) {
            if let Some(token) = checker.token(name, token_path, &raw, &model.jobs, &unreadable) {
                if let Some(other) = hashes.insert(token.sha256, name.clone()) {
                    checker.at_value(
                        &path(token_path, &["hash"]),
                        format!("has the same hash as token `{other}`: generate each token with `jobz token`"),
                    );
                }
                model.tokens.insert(name.clone(), token);
            }
        }
    }

    if checker.problems.is_empty() {
        Ok(model)
    } else {
        Err(checker.problems)
    }
}

/// A stable text for a job's definition: keys sorted, scalars as text, comments and layout gone.
fn canonical(value: &Value) -> String {
    fn normalized(value: &Value) -> Value {
        match value {
            Value::Mapping(mapping) => {
                let mut entries: Vec<(String, Value)> =
                    mapping.iter().map(|(k, v)| (key_text(k).unwrap_or_else(|| canonical(k)), normalized(v))).collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Mapping(entries.into_iter().map(|(k, v)| (Value::String(k), v)).collect())
            }
            Value::Sequence(items) => Value::Sequence(items.iter().map(normalized).collect()),
            Value::Number(n) => Value::String(n.to_string()),
            Value::Bool(b) => Value::String(b.to_string()),
            Value::Tagged(tagged) => normalized(&tagged.value),
            Value::Null | Value::String(_) => value.clone(),
        }
    }
    // Rendering plain values cannot fail; should it ever, the text still differs from any real definition.
    serde_yaml::to_string(&normalized(value)).unwrap_or_else(|error| format!("<unrenderable: {error}>"))
}

fn path(base: &[String], more: &[&str]) -> NodePath {
    let mut path = base.to_vec();
    path.extend(more.iter().map(|s| (*s).to_owned()));
    path
}

/// Where a follow-up came from; decides which placeholders its params may use.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    Job(String),
    Gate(String),
}

/// One follow-up as written, kept for the checks that need every job.
#[derive(Debug)]
struct Site {
    origin: Origin,
    /// `on_success`, `on_failure`, `then`, `on_timeout`.
    kind: &'static str,
    /// The follow-up node, and the node holding its job name.
    path: NodePath,
    job_path: NodePath,
    follow_up: FollowUp,
}

struct Checker<'p> {
    positions: &'p Positions,
    problems: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn at_value(&mut self, path: &[String], message: impl Display) {
        let location = self.positions.value(path);
        self.problems.push(Diagnostic { location, message: format!("{}: {message}", dotted(path)) });
    }

    fn at_key(&mut self, path: &[String], message: impl Display) {
        let location = self.positions.key(path);
        self.problems.push(Diagnostic { location, message: format!("{}: {message}", dotted(path)) });
    }

    fn read<T: DeserializeOwned>(&mut self, value: &Value, base: &[String]) -> Option<T> {
        let mut found = Vec::new();
        let read = raw::read(value, base, &mut found);
        for problem in found {
            let location =
                if problem.at_key { self.positions.key(&problem.path) } else { self.positions.value(&problem.path) };
            self.problems.push(Diagnostic { location, message: problem.message });
        }
        read
    }

    /// The named entries of `jobs:` or `gates:`, in file order, with their paths.
    fn entries<'v>(
        &mut self,
        mapping: Option<&'v serde_yaml::Mapping>,
        section: &str,
    ) -> Vec<(String, NodePath, &'v Value)> {
        let mut entries = Vec::new();
        for (key, value) in mapping.into_iter().flatten() {
            match key_text(key) {
                Some(name) => entries.push((name.clone(), path(&[], &[section, &name]), value)),
                None => self.at_value(
                    &[section.to_owned()],
                    format!("{section} are named by plain strings, not by lists or mappings"),
                ),
            }
        }
        entries
    }

    /// Job and gate names appear in URLs and metric labels.
    fn check_name(&mut self, path: &[String], what: &str, name: &str) {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            self.at_key(
                path,
                format!("`{name}` cannot be a {what} name: use letters, digits, `_`, `.` and `-`, starting with a letter, digit or `_`"),
            );
        }
    }

    fn job(
        &mut self,
        name: &str,
        job_path: &[String],
        raw: &RawJob,
        canonical: String,
        sites: &mut Vec<Site>,
    ) -> JobDef {
        let params = self.params(job_path, raw);
        let allowed: BTreeSet<&str> = params.keys().map(String::as_str).chain(BUILTINS.iter().copied()).collect();
        let shell = raw.shell.unwrap_or(false);
        let command = self.command(&path(job_path, &["command"]), &raw.command, shell, &allowed);
        let before = raw.before.as_ref().map(|src| self.command(&path(job_path, &["before"]), src, shell, &allowed));
        let after = raw.after.as_ref().map(|src| self.command(&path(job_path, &["after"]), src, shell, &allowed));

        let mut env = BTreeMap::new();
        for (var, Scalar(value)) in raw.env.iter().flatten() {
            let var_path = path(job_path, &["env", var]);
            if !is_identifier(var) {
                self.at_key(
                    &var_path,
                    format!("`{var}` cannot be an environment variable name: use letters, digits and `_`"),
                );
            } else if var.starts_with("JOBZ_") {
                self.at_key(&var_path, format!("`{var}`: variables starting with `JOBZ_` are set by the worker"));
            }
            if let Some(template) = self.template(&var_path, value, &allowed) {
                env.insert(var.clone(), template);
            }
        }

        let cwd = raw.cwd.as_ref().map(PathBuf::from);
        if raw.cwd.as_deref() == Some("") {
            self.at_value(&path(job_path, &["cwd"]), "is empty: leave `cwd` out to run in the worker's directory");
        }
        let timeout = self.positive_duration(&path(job_path, &["timeout"]), raw.timeout.as_ref());
        let mut retries = RetryPolicy::default();
        if let Some(raw_retries) = &raw.retries {
            retries.max = raw_retries.max.unwrap_or(0);
            if let Some(backoff) = self.duration(&path(job_path, &["retries", "backoff"]), raw_retries.backoff.as_ref())
            {
                retries.backoff = backoff;
            }
        }
        if raw.concurrency == Some(0) {
            self.at_value(&path(job_path, &["concurrency"]), "must be at least 1 (leave it out for no limit)");
        }
        let rate = raw.rate.as_ref().and_then(|Scalar(text)| match parse_rate(text) {
            Ok(rate) => Some(rate),
            Err(error) => {
                self.at_value(&path(job_path, &["rate"]), error);
                None
            }
        });
        let priority = raw.priority.unwrap_or(0);
        if !PRIORITY_RANGE.contains(&priority) {
            self.at_value(
                &path(job_path, &["priority"]),
                format!("{priority} is out of range: use -1000 to 1000 (higher runs first)"),
            );
        }
        let unique = raw.unique.as_ref().and_then(|unique| {
            let ttl = self.positive_duration(&path(job_path, &["unique", "ttl"]), unique.ttl.as_ref());
            let key_path = path(job_path, &["unique", "key"]);
            let key = self.template_unchecked(&key_path, &unique.key.0)?;
            let (too_late, rest): (Vec<&str>, Vec<&str>) = key.placeholders().partition(|name| {
                BUILTINS.contains(name) && !UNIQUE_BUILTINS.contains(name) && !params.contains_key(*name)
            });
            if let Some(name) = too_late.first() {
                self.at_value(
                    &key_path,
                    format!(
                        "`{{{name}}}` is not known when a start is checked against the key; \
                         a unique key may use the params, `{{job_name}}` and `{{run_id}}`"
                    ),
                );
            }
            let allowed: BTreeSet<&str> =
                params.keys().map(String::as_str).chain(UNIQUE_BUILTINS.iter().copied()).collect();
            self.placeholders(&key_path, rest, &allowed);
            Some(Unique { key, ttl: ttl.unwrap_or(UNIQUE_TTL_DEFAULT) })
        });

        let mut on_success = Vec::new();
        let mut on_failure = Vec::new();
        for (kind, list, out) in
            [("on_success", &raw.on_success, &mut on_success), ("on_failure", &raw.on_failure, &mut on_failure)]
        {
            for (item, item_path) in list.iter().flat_map(|l| l.items(&path(job_path, &[kind]))) {
                let site = self.site(Origin::Job(name.to_owned()), kind, item_path, item);
                out.push(site.follow_up.clone());
                sites.push(site);
            }
        }

        let mut job = JobDef {
            name: name.to_owned(),
            command,
            params,
            env,
            cwd,
            mode: match raw.mode {
                Some(raw::RawMode::Broadcast) => Mode::Broadcast,
                Some(raw::RawMode::Queue) | None => Mode::Queue,
            },
            timeout,
            retries,
            concurrency: raw.concurrency,
            rate,
            priority: i32::try_from(priority).unwrap_or(0),
            unique,
            before,
            after,
            on_success,
            on_failure,
            schedules: Vec::new(),
            canonical,
        };
        // A default must pass the same check as a given value; that check needs the whole job.
        for (param, spec) in &job.params {
            if let Some(default) = &spec.default {
                if let Some(problem) = value_problem(&job, param, default) {
                    self.at_value(
                        &path(job_path, &["params", param, "default"]),
                        format!("the default `{default}` {problem}"),
                    );
                }
            }
        }
        // Schedules are checked last: their params go through the same check as a start request, which needs the job.
        if let Some(schedules) = &raw.schedule {
            job.schedules = self.schedules(&path(job_path, &["schedule"]), schedules, &job);
        }
        job
    }

    /// A token entry: its hash and scopes. `None` when the hash is unusable (reported).
    fn token(
        &mut self,
        name: &str,
        token_path: &[String],
        raw: &RawToken,
        jobs: &BTreeMap<String, JobDef>,
        unreadable: &BTreeSet<String>,
    ) -> Option<TokenDef> {
        let hash_path = path(token_path, &["hash"]);
        let sha256 = match parse_sha256(&raw.hash) {
            Ok(hash) => Some(hash),
            Err(problem) => {
                self.at_value(&hash_path, problem);
                None
            }
        };
        let mut scopes = Scopes::default();
        let scopes_path = path(token_path, &["scopes"]);
        let items = raw.scopes.items(&scopes_path);
        if items.is_empty() {
            self.at_value(&scopes_path, "is empty: give at least one of `start`, `read`, `admin`");
        }
        for (scope, scope_path) in items {
            let start = match scope {
                RawScope::Name(word) => match word.as_str() {
                    "start" => Some(StartScope::Any),
                    "read" => {
                        scopes.read = true;
                        None
                    }
                    "admin" => {
                        scopes.admin = true;
                        None
                    }
                    other => {
                        self.at_value(
                            &scope_path,
                            format!(
                                "unknown scope `{other}`: use `start`, `read`, `admin` or `{{ start: [job names] }}`"
                            ),
                        );
                        None
                    }
                },
                RawScope::Start(limited) => {
                    let mut names = BTreeSet::new();
                    for (job, job_path) in limited.start.items(&path(&scope_path, &["start"])) {
                        if !jobs.contains_key(job) && !unreadable.contains(job) {
                            self.unknown_job(&job_path, job, jobs);
                        }
                        names.insert(job.clone());
                    }
                    Some(StartScope::Only(names))
                }
            };
            if let Some(start) = start {
                if scopes.start.replace(start).is_some() {
                    self.at_value(&scope_path, "`start` is given twice: keep one (plain `start` allows every job)");
                }
            }
        }
        Some(TokenDef { name: name.to_owned(), sha256: sha256?, scopes })
    }

    fn params(&mut self, job_path: &[String], raw: &RawJob) -> BTreeMap<String, ParamSpec> {
        let mut params = BTreeMap::new();
        // JOBZ_PARAM_<NAME> is upper case, so names differing only in case would share a variable.
        let mut upper: BTreeMap<String, String> = BTreeMap::new();
        for (name, spec) in raw.params.iter().flatten() {
            let param_path = path(job_path, &["params", name]);
            if !is_identifier(name) {
                self.at_key(
                    &param_path,
                    format!("`{name}` cannot be a param name: use letters, digits and `_`, not starting with a digit"),
                );
            } else if RESERVED_NAMES.contains(&name.as_str()) {
                self.at_key(
                    &param_path,
                    format!(
                        "`{name}` is reserved and cannot be a param name (reserved: {})",
                        RESERVED_NAMES.join(", ")
                    ),
                );
            }
            if let Some(other) = upper.insert(name.to_ascii_uppercase(), name.clone()) {
                self.at_key(
                    &param_path,
                    format!(
                        "`{name}` and `{other}` differ only in case; both would be JOBZ_PARAM_{}",
                        name.to_ascii_uppercase()
                    ),
                );
            }
            params.insert(name.clone(), self.param(&param_path, spec.as_ref()));
        }
        params
    }

    fn param(&mut self, param_path: &[String], raw: Option<&RawParam>) -> ParamSpec {
        let Some(raw) = raw else {
            return ParamSpec::default();
        };
        let pattern =
            raw.pattern.as_ref().and_then(|Scalar(source)| match regex::Regex::new(&format!("^(?:{source})$")) {
                Ok(regex) => Some(Pattern { source: source.clone(), regex }),
                Err(error) => {
                    self.at_value(
                        &path(param_path, &["pattern"]),
                        format!("`{source}` is not a valid regular expression: {}", regex_reason(&error)),
                    );
                    None
                }
            });
        let one_of = raw.one_of.as_ref().map(|list| list.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
        if one_of.as_ref().is_some_and(Vec::is_empty) {
            self.at_value(&path(param_path, &["one_of"]), "is empty, so no value could pass");
        }
        if raw.pattern.is_some() && raw.one_of.is_some() {
            self.at_key(param_path, "has both `pattern` and `one_of`: use one of them");
        }
        let required = raw.required.unwrap_or(false);
        let spec = ParamSpec { required, default: raw.default.as_ref().map(|s| s.0.clone()), pattern, one_of };
        if required && spec.default.is_some() {
            self.at_value(&path(param_path, &["required"]), "`required: true` with a `default` is contradictory: a param with a default is never missing; drop one of them");
        }
        spec
    }

    fn command(&mut self, at: &[String], source: &str, shell: bool, allowed: &BTreeSet<&str>) -> CommandTemplate {
        let parsed = if shell { CommandTemplate::parse_shell(source) } else { CommandTemplate::parse_argv(source) };
        match parsed {
            Ok(command) => {
                self.placeholders(at, command.placeholders(), allowed);
                command
            }
            Err(error) => {
                self.at_value(at, error);
                // A stand-in so the other checks can go on; the file is rejected anyway.
                CommandTemplate::Argv { source: source.to_owned(), words: Vec::new() }
            }
        }
    }

    fn template(&mut self, at: &[String], source: &str, allowed: &BTreeSet<&str>) -> Option<Template> {
        let template = self.template_unchecked(at, source)?;
        self.placeholders(at, template.placeholders().collect(), allowed);
        Some(template)
    }

    fn template_unchecked(&mut self, at: &[String], source: &str) -> Option<Template> {
        Template::parse(source).map_err(|error| self.at_value(at, error)).ok()
    }

    /// Reports each placeholder (once) that names neither a param nor a built-in.
    fn placeholders(&mut self, at: &[String], used: Vec<&str>, allowed: &BTreeSet<&str>) {
        let mut reported = BTreeSet::new();
        for name in used {
            if !allowed.contains(name) && reported.insert(name) {
                // A declared param with a reserved name is reported where it is
                // declared; it is no name to suggest.
                let usable = || allowed.iter().copied().filter(|known| !reserved_only(known));
                let hint = closest(name, usable()).map(|c| format!(" (did you mean `{{{c}}}`?)")).unwrap_or_default();
                let known: Vec<&str> = usable().collect();
                self.at_value(
                    at,
                    format!(
                        "`{{{name}}}` names no declared param nor built-in{hint}; it may use: {}",
                        known.join(", ")
                    ),
                );
            }
        }
    }

    fn duration(&mut self, at: &[String], raw: Option<&Scalar>) -> Option<Duration> {
        let Scalar(text) = raw?;
        match parse_duration(text) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.at_value(at, error);
                None
            }
        }
    }

    fn positive_duration(&mut self, at: &[String], raw: Option<&Scalar>) -> Option<Duration> {
        let duration = self.duration(at, raw)?;
        if duration.is_zero() {
            self.at_value(at, "must be longer than 0s (leave it out for none)");
            return None;
        }
        Some(duration)
    }

    fn site(&mut self, origin: Origin, kind: &'static str, at: NodePath, raw: &RawFollowUp) -> Site {
        let (job, job_path, params) = match raw {
            RawFollowUp::Name(job) => (job.clone(), at.clone(), BTreeMap::new()),
            RawFollowUp::Full(full) => {
                let mut params = BTreeMap::new();
                for (param, Scalar(value)) in full.params.iter().flatten() {
                    if let Some(template) = self.template_unchecked(&path(&at, &["params", param]), value) {
                        params.insert(param.clone(), template);
                    }
                }
                (full.job.clone(), path(&at, &["job"]), params)
            }
        };
        Site { origin, kind, path: at, job_path, follow_up: FollowUp { job, params } }
    }

    fn schedules(&mut self, at: &[String], raw: &OneOrMany<raw::RawSchedule>, job: &JobDef) -> Vec<Schedule> {
        let mut schedules = Vec::new();
        for (schedule, schedule_path) in raw.items(at) {
            let cron_path = path(&schedule_path, &["cron"]);
            let cron = match croner::Cron::from_str(&schedule.cron) {
                Ok(pattern) => Some(Cron { source: schedule.cron.clone(), pattern }),
                Err(error) => {
                    self.at_value(
                        &cron_path,
                        format!(
                            "`{}` is not a valid cron expression: {error}; e.g. `0 3 * * *` runs at 03:00 every day",
                            schedule.cron
                        ),
                    );
                    None
                }
            };
            let timezone = match schedule.timezone.as_deref() {
                None => Some(chrono_tz::Tz::UTC),
                Some(name) => chrono_tz::Tz::from_str(name).ok().or_else(|| {
                    self.at_value(&path(&schedule_path, &["timezone"]), format!("unknown time zone `{name}`: use an IANA name such as `Europe/Madrid`, `America/New_York` or `UTC`"));
                    None
                }),
            };
            let given: BTreeMap<String, String> =
                schedule.params.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
            if let Err(errors) = params::validate(job, &given) {
                for error in errors {
                    let param_path = path(&schedule_path, &["params", &error.param]);
                    match error.problem {
                        params::ParamProblem::Missing => {
                            self.at_value(&schedule_path, format!("never sets the required param `{}`", error.param))
                        }
                        params::ParamProblem::Undeclared => {
                            self.at_key(&param_path, format!("job `{}` has no param `{}`", job.name, error.param))
                        }
                        _ => self.at_value(&param_path, &error),
                    }
                }
            }
            let catch_up = match schedule.catch_up {
                Some(raw::RawCatchUp::None) => CatchUp::None,
                Some(raw::RawCatchUp::Latest) | None => CatchUp::Latest,
            };
            if let (Some(cron), Some(timezone)) = (cron, timezone) {
                schedules.push(Schedule { cron, timezone, params: given, catch_up });
            }
        }
        schedules
    }

    fn gate(
        &mut self,
        name: &str,
        gate_path: &[String],
        raw: &RawGate,
        jobs: &BTreeMap<String, JobDef>,
        unreadable: &BTreeSet<String>,
        sites: &mut Vec<Site>,
    ) -> GateDef {
        let after_items = raw.after.items(&path(gate_path, &["after"]));
        if after_items.is_empty() {
            self.at_value(&path(gate_path, &["after"]), "is empty: name the upstream job(s) the gate waits for");
        }
        let mut after = Vec::new();
        let mut upstream = Vec::new();
        for (job, at) in after_items {
            match jobs.get(job) {
                Some(def) => upstream.push(def),
                None if unreadable.contains(job) => {}
                None => self.unknown_job(&at, job, jobs),
            }
            after.push(job.clone());
        }
        if raw.count == Some(0) {
            self.at_value(
                &path(gate_path, &["count"]),
                "must be at least 1 (leave it out for one success of each upstream job)",
            );
        }
        // A key groups successes of every upstream job, so it may only use what all of them have.
        let all_known = upstream.len() == after.len();
        let key = raw.key.as_ref().and_then(|Scalar(source)| {
            if !all_known {
                // Some upstream job is unknown (and reported): its params cannot be checked.
                return self.template_unchecked(&path(gate_path, &["key"]), source);
            }
            let mut allowed: BTreeSet<&str> = upstream
                .first()
                .map(|first| {
                    first
                        .params
                        .keys()
                        .map(String::as_str)
                        .filter(|p| upstream.iter().all(|j| j.params.contains_key(*p)))
                        .collect()
                })
                .unwrap_or_default();
            allowed.insert("run_id");
            self.template(&path(gate_path, &["key"]), source, &allowed)
        });
        let timeout = self.positive_duration(&path(gate_path, &["timeout"]), raw.timeout.as_ref());
        if raw.on_timeout.is_some() && raw.timeout.is_none() {
            self.at_key(&path(gate_path, &["on_timeout"]), "never fires without a `timeout`");
        }
        let origin = Origin::Gate(name.to_owned());
        let then = self.site(origin.clone(), "then", path(gate_path, &["then"]), &raw.then);
        let on_timeout = raw
            .on_timeout
            .as_ref()
            .map(|r| self.site(origin.clone(), "on_timeout", path(gate_path, &["on_timeout"]), r));
        let on_failure = raw
            .on_failure
            .as_ref()
            .map(|r| self.site(origin.clone(), "on_failure", path(gate_path, &["on_failure"]), r));
        let gate = GateDef {
            name: name.to_owned(),
            after,
            count: raw.count,
            key,
            then: then.follow_up.clone(),
            timeout,
            on_timeout: on_timeout.as_ref().map(|s| s.follow_up.clone()),
            on_failure: on_failure.as_ref().map(|s| s.follow_up.clone()),
        };
        sites.extend([Some(then), on_timeout, on_failure].into_iter().flatten());
        gate
    }

    fn unknown_job(&mut self, at: &[String], name: &str, jobs: &BTreeMap<String, JobDef>) {
        let hint = closest(name, jobs.keys().map(String::as_str))
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        self.at_value(at, format!("no job named `{name}`{hint}"));
    }

    /// Checks a follow-up against its target and the params its source can give it.
    fn follow_up(&mut self, site: &Site, model: &JobFile, unreadable: &BTreeSet<String>) {
        let target_name = &site.follow_up.job;
        let Some(target) = model.jobs.get(target_name) else {
            if !unreadable.contains(target_name) {
                self.unknown_job(&site.job_path, target_name, &model.jobs);
            }
            return;
        };
        // What the source passes on (inherited params) and what its templates may use.
        // An unknown upstream job of a gate is reported on its own; what it would pass on is unknown.
        let upstream_known = match &site.origin {
            Origin::Job(_) => true,
            Origin::Gate(gate) => {
                model.gates.get(gate).is_some_and(|g| g.after.iter().all(|j| model.jobs.contains_key(j)))
            }
        };
        let (source_name, inherited, builtins): (String, BTreeSet<&str>, &[&str]) = match &site.origin {
            Origin::Job(job) => {
                let params =
                    model.jobs.get(job).map(|j| j.params.keys().map(String::as_str).collect()).unwrap_or_default();
                (format!("`{job}`"), params, FOLLOW_UP_BUILTINS)
            }
            Origin::Gate(gate) => {
                let after = model.gates.get(gate).map(|g| g.after.as_slice()).unwrap_or_default();
                let params = after
                    .iter()
                    .filter_map(|job| model.jobs.get(job))
                    .flat_map(|j| j.params.keys().map(String::as_str))
                    .collect();
                (format!("gate `{gate}`"), params, GATE_BUILTINS)
            }
        };
        let mut allowed = inherited.clone();
        allowed.extend(builtins.iter().copied());
        if matches!(site.origin, Origin::Job(_)) {
            allowed.extend(BUILTINS.iter().copied());
        }
        for (param, template) in &site.follow_up.params {
            let at = path(&site.path, &["params", param]);
            match target.params.get(param) {
                None => {
                    let declared: Vec<&str> = target.params.keys().map(String::as_str).collect();
                    self.at_key(
                        &at,
                        format!(
                            "job `{target_name}` has no param `{param}` (it declares: {})",
                            list_or_none(&declared)
                        ),
                    );
                }
                Some(_) => {
                    let used: Vec<&str> = template.placeholders().collect();
                    if used.is_empty() {
                        // A value with no placeholder is known now: check it as the target will.
                        if let Some(problem) = value_problem(target, param, template.source()) {
                            self.at_value(&at, format!("`{}` for job `{target_name}`: {problem}", template.source()));
                        }
                    } else if upstream_known {
                        self.placeholders(&at, used, &allowed);
                    }
                }
            }
        }
        for (param, spec) in &target.params {
            if upstream_known
                && spec.required
                && spec.default.is_none()
                && !inherited.contains(param.as_str())
                && !site.follow_up.params.contains_key(param)
            {
                self.at_value(
                    &site.path,
                    format!("follow-up {} from {source_name} to `{target_name}` never sets required param `{param}`; add `params: {{ {param}: ... }}`", site.kind),
                );
            }
        }
    }

    /// Reports every chain of successes that never ends: `on_success` edges and gates' `then`.
    fn cycles(&mut self, sites: &[Site], model: &JobFile) {
        // Nodes are jobs and gates; each edge remembers where it is written.
        let mut edges: BTreeMap<Origin, Vec<(Origin, Location)>> = BTreeMap::new();
        for site in sites.iter().filter(|s| matches!(s.kind, "on_success" | "then")) {
            if model.jobs.contains_key(&site.follow_up.job) {
                let at = self.positions.value(&site.path);
                edges.entry(site.origin.clone()).or_default().push((Origin::Job(site.follow_up.job.clone()), at));
            }
        }
        for (name, gate) in &model.gates {
            let at = self.positions.value(&path(&[], &["gates", name, "after"]));
            for job in gate.after.iter().filter(|j| model.jobs.contains_key(*j)) {
                edges.entry(Origin::Job(job.clone())).or_default().push((Origin::Gate(name.clone()), at));
            }
        }
        let reach: BTreeMap<&Origin, BTreeSet<&Origin>> =
            edges.keys().map(|node| (node, reachable(node, &edges))).collect();
        let mut done: BTreeSet<&Origin> = BTreeSet::new();
        for (node, reached) in &reach {
            let out = edges.get(*node).into_iter().flatten();
            if let Some((_, at)) = out.into_iter().find(|(to, _)| to == *node) {
                self.problems.push(Diagnostic {
                    location: *at,
                    message: format!("{} starts itself on success, an endless chain; to run a job again use `retries` (after a failure) or a `schedule`", node_name(node)),
                });
            }
            if done.contains(node) || !reached.contains(node) {
                continue;
            }
            let component: BTreeSet<&Origin> =
                reached.iter().copied().filter(|other| reach.get(other).is_some_and(|r| r.contains(node))).collect();
            done.extend(component.iter().copied());
            if component.len() < 2 {
                continue;
            }
            // Start where the cycle is first written, so the report points at the top-most edge.
            let Some((start, at)) = component
                .iter()
                .flat_map(|from| {
                    edges
                        .get(*from)
                        .into_iter()
                        .flatten()
                        .filter(|(to, _)| to != *from && component.contains(to))
                        .map(move |(_, at)| (*from, *at))
                })
                .min_by_key(|(_, at)| *at)
            else {
                continue;
            };
            let cycle = shortest_cycle(start, &edges, &component);
            let names: Vec<String> = cycle.iter().map(|n| node_name(n)).collect();
            self.problems.push(Diagnostic {
                location: at,
                message: format!(
                    "on_success cycle {}: each success starts the next, so the chain never ends; to run a job again use `retries` (after a failure) or a `schedule`, not a follow-up",
                    names.join(" -> ")
                ),
            });
        }
    }
}

fn node_name(node: &Origin) -> String {
    match node {
        Origin::Job(job) => format!("`{job}`"),
        Origin::Gate(gate) => format!("gate `{gate}`"),
    }
}

/// Every node reachable from `start` by one or more edges.
fn reachable<'a>(start: &'a Origin, edges: &'a BTreeMap<Origin, Vec<(Origin, Location)>>) -> BTreeSet<&'a Origin> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![start];
    while let Some(node) = stack.pop() {
        for (to, _) in edges.get(node).into_iter().flatten() {
            if seen.insert(to) {
                stack.push(to);
            }
        }
    }
    seen
}

/// The shortest path from `start` back to itself inside `component`, as `start -> ... -> start`.
fn shortest_cycle<'a>(
    start: &'a Origin,
    edges: &'a BTreeMap<Origin, Vec<(Origin, Location)>>,
    component: &BTreeSet<&'a Origin>,
) -> Vec<&'a Origin> {
    let mut parent: BTreeMap<&Origin, &Origin> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for (to, _) in edges.get(node).into_iter().flatten() {
            if to == start {
                let mut back = Vec::new();
                let mut at = node;
                while at != start {
                    back.push(at);
                    match parent.get(at) {
                        Some(previous) => at = previous,
                        None => break,
                    }
                }
                back.reverse();
                let mut cycle = vec![start];
                cycle.extend(back);
                cycle.push(start);
                return cycle;
            }
            if component.contains(to) && !parent.contains_key(to) && to != start {
                parent.insert(to, node);
                queue.push_back(to);
            }
        }
    }
    vec![start, start]
}

/// Why `value` would be refused for `job`'s param `param`, checked as a start request is.
fn value_problem(job: &JobDef, param: &str, value: &str) -> Option<params::ParamProblem> {
    let given = BTreeMap::from([(param.to_owned(), value.to_owned())]);
    params::validate(job, &given).err()?.into_iter().find(|e| e.param == param).map(|e| e.problem)
}

/// `sha256:HEX` (64 hex digits, either case) as the hash's bytes.
fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let usage = "write `sha256:` and the 64 hex digits of the token's SHA-256 (`jobz token` prints the line)";
    let Some(hex) = text.strip_prefix("sha256:") else {
        return Err(format!("is not a token hash: {usage}"));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("the hash is {} characters long, not 64 hex digits: {usage}", hex.len()));
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| format!("is not hex: {usage}"))?;
    }
    Ok(hash)
}

/// `[A-Za-z_][A-Za-z0-9_]*`: param names, placeholder names, environment variable names.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The first line of the regex crate's explanation, without its multi-line caret drawing.
fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .find_map(|line| line.strip_prefix("error: "))
        .map_or_else(|| text.lines().collect::<Vec<_>>().join(" "), str::to_owned)
}

/// The candidate closest to `name` by edit distance, if close enough to be a typo.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates.map(|c| (edit_distance(name, c), c)).filter(|(d, _)| *d <= limit).min().map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb)).min(row[j] + 1).min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}
