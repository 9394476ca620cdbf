//! Turns a job definition and checked params into what a runner executes:
//! filled argv vectors and the `JOBZ_*` environment (SPEC "Running a command
//! safely"). The network never carries a command: workers call this on their
//! own job file with the names and values they received.

use config::template::{FillError, Values};
use config::JobDef;

use crate::pipeline::JobFacts;

/// The filled steps of one attempt, ready for the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub before: Option<Vec<String>>,
    pub command: Vec<String>,
    pub after: Option<Vec<String>>,
    /// The job's own `env` (filled) and the `JOBZ_*` variables.
    pub env: Vec<(String, String)>,
}

/// Fills `def`'s commands for the attempt described by `job`. `url` is the front
/// door's address, given to the process as `JOBZ_URL` so that `jobz start` and
/// `jobz progress` inside a job reach it. Declared params that were not given
/// and have no default fill as empty strings.
pub fn prepare(def: &JobDef, job: &JobFacts, url: Option<&str>) -> Result<Prepared, FillError> {
    let mut values: Values = def.params.keys().map(|name| (name.clone(), String::new())).collect();
    values.extend(job.values());
    let before = def.before.as_ref().map(|t| t.fill(&values)).transpose()?;
    let command = def.command.fill(&values)?;
    let after = def.after.as_ref().map(|t| t.fill(&values)).transpose()?;
    let mut env = Vec::with_capacity(def.env.len() + job.params.len() + 5);
    for (name, template) in &def.env {
        env.push((name.clone(), template.fill(&values)?));
    }
    for name in def.params.keys() {
        let value = job.params.get(name).cloned().unwrap_or_default();
        env.push((format!("JOBZ_PARAM_{}", name.to_ascii_uppercase()), value));
    }
    env.push(("JOBZ_JOB_ID".into(), job.id.clone()));
    env.push(("JOBZ_JOB_NAME".into(), job.job_name.clone()));
    env.push(("JOBZ_RUN_ID".into(), job.run_id.clone()));
    env.push(("JOBZ_ATTEMPT".into(), job.attempt.to_string()));
    if let Some(url) = url {
        env.push(("JOBZ_URL".into(), url.to_string()));
    }
    Ok(Prepared { before, command, after, env })
}
