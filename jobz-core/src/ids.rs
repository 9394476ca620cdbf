//! Job ids and retry jitter: the two things every process draws fresh. Kept
//! apart from the pure pipeline, which takes both as arguments.

use std::hash::{BuildHasher, Hasher};

use crate::pipeline::JobFacts;

/// A new job id: a UUID v7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A jitter value in `[0, 1)` for a retry's backoff that differs between jobs
/// and attempts, drawn from the standard library's per-process random hasher keys.
pub fn jitter(job: &JobFacts) -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(job.id.as_bytes());
    hasher.write_u32(job.attempt);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_its_range_and_ids_sort_by_creation() {
        let job =
            JobFacts { id: new_id(), job_name: "a".into(), params: Default::default(), run_id: "r".into(), attempt: 1 };
        for attempt in 1..100 {
            let j = jitter(&JobFacts { attempt, ..job.clone() });
            assert!((0.0..1.0).contains(&j), "{j}");
        }
        let (a, b) = (new_id(), new_id());
        assert!(a < b, "{a} then {b}");
    }
}
