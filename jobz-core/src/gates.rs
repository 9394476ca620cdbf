//! Gate counting: which upstream successes complete which key, once.
//!
//! A [`GateBook`] is fed the durable events of upstream jobs (a success, a
//! failure for good) and the passing of time; it answers with the jobs to
//! start. It holds no other truth: the broker keeps the events and an
//! idempotent record of each fire, and a semaphore that restarts rebuilds its
//! book by replaying them. Eager mode feeds the same book in process.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use config::template::Values;
use config::{FollowUp, GateDef, JobFile};

use crate::limits::GATE_OPEN_KEYS_MAX;
use crate::pipeline::{self, GateReason, JobFacts, NewJob, Origin};

/// Something that happened to an upstream job, as the gates see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// The job succeeded (any attempt).
    Succeeded(JobFacts),
    /// The job ended failed or timed out after its last attempt.
    FailedForGood(JobFacts),
}

/// Where one key of one gate stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    pub opened_at: DateTime<Utc>,
    /// The run of the first upstream job seen for this key; the jobs the gate starts join it.
    pub run_id: String,
    /// The params named by the key template, from the first upstream job seen (the key's params).
    pub key_params: BTreeMap<String, String>,
    /// Distinct succeeded job ids per upstream job name: a job that runs twice counts once.
    pub succeeded: BTreeMap<String, BTreeSet<String>>,
    pub fired: bool,
    pub failed: bool,
    pub timed_out: bool,
}

impl KeyState {
    /// `(done, needed)` summed over the gate's upstream jobs, e.g. `(7, 10)`.
    pub fn progress(&self, gate: &GateDef) -> (u32, u32) {
        let need = gate.count.unwrap_or(1);
        let done =
            gate.after.iter().map(|name| self.succeeded.get(name).map_or(0, |ids| ids.len() as u32).min(need)).sum();
        (done, need.saturating_mul(gate.after.len() as u32))
    }

    fn is_complete(&self, gate: &GateDef) -> bool {
        let (done, need) = self.progress(gate);
        done >= need
    }

    /// Whether the key still waits for upstream successes.
    pub fn is_open(&self) -> bool {
        !self.fired && !self.timed_out
    }
}

/// A job a gate wants started, or a key that could not be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateEffect {
    Start(NewJob),
    /// The event could not be applied to this gate (e.g. the key template
    /// cannot be filled from the upstream job's params). Nothing changed.
    KeyError {
        gate: String,
        job_id: String,
        message: String,
    },
}

/// The state of every gate's keys.
#[derive(Debug, Clone, Default)]
pub struct GateBook {
    keys: BTreeMap<String, BTreeMap<String, KeyState>>,
    /// Open keys per gate: the bound applies to these, not to keys long settled.
    open: BTreeMap<String, usize>,
}

impl GateBook {
    pub fn new() -> GateBook {
        GateBook::default()
    }

    /// The keys of `gate`, by key.
    pub fn keys(&self, gate: &str) -> Option<&BTreeMap<String, KeyState>> {
        self.keys.get(gate)
    }

    /// Applies one upstream event at `now`; returns the jobs to start.
    pub fn observe(&mut self, file: &JobFile, event: &UpstreamEvent, now: DateTime<Utc>) -> Vec<GateEffect> {
        let (job, failed) = match event {
            UpstreamEvent::Succeeded(job) => (job, false),
            UpstreamEvent::FailedForGood(job) => (job, true),
        };
        let mut effects = Vec::new();
        for gate in file.gates.values().filter(|g| g.after.contains(&job.job_name)) {
            let key = match gate_key(gate, job) {
                Ok(key) => key,
                Err(message) => {
                    effects.push(GateEffect::KeyError { gate: gate.name.clone(), job_id: job.id.clone(), message });
                    continue;
                }
            };
            let keys = self.keys.entry(gate.name.clone()).or_default();
            let open = self.open.entry(gate.name.clone()).or_default();
            if !keys.contains_key(&key) && *open >= GATE_OPEN_KEYS_MAX {
                effects.push(GateEffect::KeyError {
                    gate: gate.name.clone(),
                    job_id: job.id.clone(),
                    message: format!("gate has {GATE_OPEN_KEYS_MAX} open keys already; key {key:?} refused"),
                });
                continue;
            }
            if !keys.contains_key(&key) {
                *open += 1;
            }
            let state = keys.entry(key.clone()).or_insert_with(|| KeyState {
                opened_at: now,
                run_id: job.run_id.clone(),
                key_params: key_params(gate, job),
                succeeded: BTreeMap::new(),
                fired: false,
                failed: false,
                timed_out: false,
            });
            if state.timed_out || state.fired {
                continue;
            }
            if failed {
                if !state.failed {
                    state.failed = true;
                    if let Some(on_failure) = &gate.on_failure {
                        effects.push(start(file, gate, &key, state, on_failure, GateReason::Failure, Some(job)));
                    }
                }
                continue;
            }
            state.succeeded.entry(job.job_name.clone()).or_default().insert(job.id.clone());
            if state.is_complete(gate) {
                state.fired = true;
                *open = open.saturating_sub(1);
                effects.push(start(file, gate, &key, state, &gate.then, GateReason::Then, Some(job)));
            }
        }
        effects
    }

    /// Gives up the open keys whose gate timeout has passed at `now`, firing `on_timeout`.
    pub fn expire(&mut self, file: &JobFile, now: DateTime<Utc>) -> Vec<GateEffect> {
        let mut effects = Vec::new();
        for (gate_name, keys) in &mut self.keys {
            let Some(gate) = file.gates.get(gate_name) else { continue };
            let Some(timeout) = gate.timeout.and_then(|t| chrono::Duration::from_std(t).ok()) else { continue };
            for (key, state) in keys.iter_mut() {
                // A failed key has told its story through `on_failure`; it does not time out as well.
                if state.is_open() && !state.failed && now >= state.opened_at + timeout {
                    state.timed_out = true;
                    if let Some(open) = self.open.get_mut(gate_name) {
                        *open = open.saturating_sub(1);
                    }
                    if let Some(on_timeout) = &gate.on_timeout {
                        effects.push(start(file, gate, key, state, on_timeout, GateReason::Timeout, None));
                    }
                }
            }
        }
        effects
    }
}

/// The digest of the `gates:` section of `file` ([`crate::protocol::digest`]
/// of a canonical text): a semaphore sends it in `Subscribe` and the broker
/// refuses one whose gates differ from its own, since both must count the same
/// events the same way. The text is JSON (stable quoting) of each gate in name
/// order: name, `after` as written, `count`, the key template's source, the
/// `then`/`on_timeout`/`on_failure` job names with their param templates'
/// sources (in param order), and the timeout in milliseconds. Layout, comments
/// and key order in the YAML do not change it.
pub fn digest(file: &JobFile) -> String {
    fn follow_up(f: Option<&FollowUp>) -> serde_json::Value {
        match f {
            None => serde_json::Value::Null,
            Some(f) => {
                let params: BTreeMap<&str, &str> = f.params.iter().map(|(k, t)| (k.as_str(), t.source())).collect();
                serde_json::json!({ "job": f.job, "params": params })
            }
        }
    }
    let gates: Vec<serde_json::Value> = file
        .gates
        .values()
        .map(|g| {
            serde_json::json!({
                "name": g.name,
                "after": g.after,
                "count": g.count,
                "key": g.key.as_ref().map(|k| k.source()),
                "then": follow_up(Some(&g.then)),
                "on_timeout": follow_up(g.on_timeout.as_ref()),
                "on_failure": follow_up(g.on_failure.as_ref()),
                "timeout_ms": g.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            })
        })
        .collect();
    // Object keys come out in a fixed order (sorted; or as written above if some crate turns on
    // serde_json's `preserve_order`), and strings are JSON-quoted: the text is canonical.
    crate::protocol::digest(&serde_json::Value::Array(gates).to_string())
}

/// Whether a fire for `reason` must be refused for a key that already has
/// fires for `recorded`: the rule by which the broker keeps a gate's fires
/// exactly-once when semaphores disagree. A [`GateBook`] gives up a key
/// (`on_timeout`) only while it has neither completed (`then`) nor failed
/// (`on_failure`), and never completes or fails it after giving it up; but two
/// semaphores (or one before and after a rebuild) can see the same key on
/// either side of its deadline, because the deadline is read from a clock
/// while the events arrive over the network. So `Timeout` conflicts with
/// `Then` and `Failure` both ways, the first recorded wins; `Then` and
/// `Failure` coexist (a key whose failed shard is retried and succeeds
/// completes after all); and a repeat of a recorded reason is not a conflict
/// but the same fire, answered with its job.
pub fn fire_conflicts(recorded: &[GateReason], reason: GateReason) -> bool {
    match reason {
        GateReason::Timeout => recorded.iter().any(|r| *r != GateReason::Timeout),
        GateReason::Then | GateReason::Failure => recorded.contains(&GateReason::Timeout),
    }
}

/// The key an upstream job counts toward: the gate's key template filled with
/// the job's params and run id, or the run id when the gate has no key.
pub fn gate_key(gate: &GateDef, job: &JobFacts) -> Result<String, String> {
    match &gate.key {
        None => Ok(job.run_id.clone()),
        Some(template) => template.fill(&job.values()).map_err(|e| {
            format!("gate {:?}: key {:?} cannot be filled from job {}: {e}", gate.name, template.source(), job.id)
        }),
    }
}

fn key_params(gate: &GateDef, job: &JobFacts) -> BTreeMap<String, String> {
    let Some(template) = &gate.key else { return BTreeMap::new() };
    template.placeholders().filter_map(|name| job.params.get(name).map(|v| (name.to_string(), v.clone()))).collect()
}

fn start(
    file: &JobFile,
    gate: &GateDef,
    key: &str,
    state: &KeyState,
    follow_up: &FollowUp,
    reason: GateReason,
    upstream: Option<&JobFacts>,
) -> GateEffect {
    let mut values: Values = upstream.map(|j| j.params.clone()).unwrap_or_default();
    values.extend(state.key_params.clone());
    values.insert("run_id".into(), state.run_id.clone());
    values.insert("gate".into(), gate.name.clone());
    values.insert("key".into(), key.to_string());
    match pipeline::child(file, follow_up, &state.key_params, &values) {
        Ok(params) => GateEffect::Start(NewJob {
            job_name: follow_up.job.clone(),
            params,
            run_id: Some(state.run_id.clone()),
            parent_id: upstream.map(|j| j.id.clone()),
            origin: Origin::Gate { gate: gate.name.clone(), key: key.to_string(), reason },
        }),
        Err(e) => GateEffect::KeyError {
            gate: gate.name.clone(),
            job_id: upstream.map(|j| j.id.clone()).unwrap_or_default(),
            message: format!("gate {:?} key {key:?}: {e}", gate.name),
        },
    }
}
