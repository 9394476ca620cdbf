//! The job file exactly as written: serde types that mirror the YAML.
//!
//! Strict (unknown keys are errors) and free of logic: checking and converting
//! is [`crate::check`]'s job. Each job and gate is read on its own, and a read
//! that fails is repaired and retried (an unknown key is dropped, a value of the
//! wrong type is blanked), so one mistake does not hide the next one. Only this
//! module and [`crate::check`] know `serde_yaml`.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer, StrDeserializer};
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::position::NodePath;

/// How many times one job or gate is repaired and read again before giving up.
const REPAIRS_MAX: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `jobs:` and optionally `gates:` and `tokens:`")]
pub(crate) struct RawFile {
    pub jobs: Option<Mapping>,
    pub gates: Option<Mapping>,
    pub tokens: Option<Mapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a token: a mapping like `{ hash: \"sha256:HEX\", scopes: [ start, read ] }`")]
pub(crate) struct RawToken {
    pub hash: String,
    pub scopes: OneOrMany<RawScope>,
}

/// A scope: `start`, `read` or `admin`, or `{ start: [job names] }`.
#[derive(Debug)]
pub(crate) enum RawScope {
    Name(String),
    Start(RawStartScope),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "`{ start: [job names] }`")]
pub(crate) struct RawStartScope {
    pub start: OneOrMany<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a job: a mapping with at least `command`")]
pub(crate) struct RawJob {
    pub command: String,
    pub shell: Option<bool>,
    pub params: Option<BTreeMap<String, Option<RawParam>>>,
    pub env: Option<BTreeMap<String, Scalar>>,
    pub cwd: Option<String>,
    pub mode: Option<RawMode>,
    pub timeout: Option<Scalar>,
    pub retries: Option<RawRetries>,
    pub concurrency: Option<u32>,
    pub rate: Option<Scalar>,
    pub priority: Option<i64>,
    pub unique: Option<RawUnique>,
    pub before: Option<String>,
    pub after: Option<String>,
    pub on_success: Option<OneOrMany<RawFollowUp>>,
    pub on_failure: Option<OneOrMany<RawFollowUp>>,
    pub schedule: Option<OneOrMany<RawSchedule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a param: a mapping with `required`, `default`, `pattern` or `one_of`")]
pub(crate) struct RawParam {
    pub required: Option<bool>,
    pub default: Option<Scalar>,
    pub pattern: Option<Scalar>,
    pub one_of: Option<Vec<Scalar>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawMode {
    Queue,
    Broadcast,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "retries: a mapping like `{ max: 3, backoff: 10s }`")]
pub(crate) struct RawRetries {
    pub max: Option<u32>,
    pub backoff: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "unique: a mapping like `{ key: \"{date}\", ttl: 24h }`")]
pub(crate) struct RawUnique {
    pub key: Scalar,
    pub ttl: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a schedule: a mapping like `{ cron: \"0 3 * * *\", timezone: Europe/Madrid }`"
)]
pub(crate) struct RawSchedule {
    pub cron: String,
    pub timezone: Option<String>,
    pub params: Option<BTreeMap<String, Scalar>>,
    pub catch_up: Option<RawCatchUp>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawCatchUp {
    Latest,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a gate: a mapping with at least `after` and `then`")]
pub(crate) struct RawGate {
    pub after: OneOrMany<String>,
    pub count: Option<u32>,
    pub key: Option<Scalar>,
    pub then: RawFollowUp,
    pub timeout: Option<Scalar>,
    pub on_timeout: Option<RawFollowUp>,
    pub on_failure: Option<RawFollowUp>,
}

/// A follow-up: a bare job name, or `{ job: NAME, params: { k: template } }`.
#[derive(Debug)]
pub(crate) enum RawFollowUp {
    Name(String),
    Full(RawFollowUpMap),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFollowUpMap {
    pub job: String,
    pub params: Option<BTreeMap<String, Scalar>>,
}

/// A string as the model wants it, though YAML may have typed it as a number or a
/// boolean: users write `default: 10` and mean the text `10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scalar(pub String);

/// One item, or a list of them (`schedule:`, `after:`, `on_success:`).
#[derive(Debug)]
pub(crate) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The items with their paths: `base` itself for a single item, `base.N` for list items.
    pub fn items(&self, base: &[String]) -> Vec<(&T, NodePath)> {
        match self {
            OneOrMany::One(item) => vec![(item, base.to_vec())],
            OneOrMany::Many(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let mut path = base.to_vec();
                    path.push(i.to_string());
                    (item, path)
                })
                .collect(),
        }
    }
}

/// What a type is called in "expected ..." messages about a list of it.
pub(crate) trait Named {
    const WHAT: &'static str;
}

impl Named for String {
    const WHAT: &'static str = "a job name or a list of job names";
}

impl Named for RawFollowUp {
    const WHAT: &'static str = "a follow-up (a job name or `{ job: NAME, params: {...} }`) or a list of them";
}

impl Named for RawScope {
    const WHAT: &'static str = "a scope (`start`, `read`, `admin` or `{ start: [job names] }`) or a list of them";
}

impl Named for RawSchedule {
    const WHAT: &'static str = "a schedule (`{ cron: \"0 3 * * *\" }`) or a list of them";
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                // serde_yaml's own rendering keeps `1.0` as `1.0`, not `1`.
                Ok(Scalar(serde_yaml::Number::from(v).to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

impl<'de> Deserialize<'de> for RawFollowUp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FollowUpVisitor;
        impl<'de> Visitor<'de> for FollowUpVisitor {
            type Value = RawFollowUp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a job name or `{ job: NAME, params: {...} }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawFollowUp, E> {
                Ok(RawFollowUp::Name(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawFollowUp, A::Error> {
                RawFollowUpMap::deserialize(MapAccessDeserializer::new(map)).map(RawFollowUp::Full)
            }
        }
        deserializer.deserialize_any(FollowUpVisitor)
    }
}

impl<'de> Deserialize<'de> for RawScope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScopeVisitor;
        impl<'de> Visitor<'de> for ScopeVisitor {
            type Value = RawScope;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`start`, `read`, `admin` or `{ start: [job names] }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawScope, E> {
                Ok(RawScope::Name(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawScope, A::Error> {
                RawStartScope::deserialize(MapAccessDeserializer::new(map)).map(RawScope::Start)
            }
        }
        deserializer.deserialize_any(ScopeVisitor)
    }
}

impl<'de, T: Deserialize<'de> + Named> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Named> Visitor<'de> for OneOrManyVisitor<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(T::WHAT)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany<T>, E> {
                T::deserialize(StrDeserializer::<E>::new(v)).map(OneOrMany::One)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OneOrMany<T>, A::Error> {
                Vec::<T>::deserialize(SeqAccessDeserializer::new(seq)).map(OneOrMany::Many)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OneOrMany<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(OneOrMany::One)
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor(PhantomData))
    }
}

/// Reads YAML text into a value like `serde_yaml::from_str` does, except that a
/// repeated key keeps its first value instead of failing the whole file: the
/// position index reports duplicates with both lines, and the rest of the file
/// can still be checked.
pub(crate) fn load_value(text: &str) -> Result<Value, serde_yaml::Error> {
    serde_yaml::from_str::<Lenient>(text).map(|lenient| lenient.0)
}

struct Lenient(Value);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LenientVisitor).map(Lenient)
    }
}

struct LenientVisitor;

impl<'de> Visitor<'de> for LenientVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(LenientVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Lenient(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut mapping = Mapping::new();
        while let Some(Lenient(key)) = map.next_key()? {
            let Lenient(value) = map.next_value()?;
            if !mapping.contains_key(&key) {
                mapping.insert(key, value);
            }
        }
        Ok(Value::Mapping(mapping))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom("YAML tags (`!name value`) are not supported in a job file"))
    }
}

/// A problem met while reading a raw type: the path of the node (from the file's
/// root), whether to point at its key rather than its value, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawProblem {
    pub path: NodePath,
    pub at_key: bool,
    pub message: String,
}

/// Reads `value` (found at `base`) as a `T`, reporting every problem: after each
/// error the offending node is dropped (unknown key) or blanked (bad value) and the
/// read is tried again. Returns `None` when the value cannot be repaired into a `T`
/// (a required field is missing or wrong), after reporting why.
pub(crate) fn read<T: DeserializeOwned>(value: &Value, base: &[String], problems: &mut Vec<RawProblem>) -> Option<T> {
    let mut value = value.clone();
    let mut removed: Vec<NodePath> = Vec::new();
    let mut blanked: Vec<NodePath> = Vec::new();
    for _ in 0..REPAIRS_MAX {
        let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(read) => return Some(read),
            Err(error) => error,
        };
        let inside: NodePath = error.path().iter().map(segment_text).collect();
        if blanked.contains(&inside) {
            // A field that must have a value, blanked after its problem was
            // reported: the blank is no second problem, and nothing repairs it.
            return None;
        }
        let message = error.inner().to_string();
        let mut path = base.to_vec();
        path.extend(inside.iter().cloned());
        if message.starts_with("missing field") && removed.iter().any(|r| r[..r.len() - 1] == inside[..]) {
            // The field was there under a misspelt name, already reported as unknown.
            return None;
        }
        let unknown = message.starts_with("unknown field");
        let missing = message.starts_with("missing field");
        let message = format!("{}: {message}", dotted(path_to_node(&path, unknown)));
        problems.push(RawProblem { message, path, at_key: unknown || missing });
        // A missing field cannot be made up; anything else can be dropped or blanked and read again.
        let repaired = !missing && if unknown { remove(&mut value, &inside) } else { blank(&mut value, &inside) };
        if !repaired {
            return None;
        }
        if unknown {
            removed.push(inside);
        } else {
            blanked.push(inside);
        }
    }
    None
}

/// For an unknown key the message is about the mapping that holds it.
fn path_to_node(path: &[String], unknown: bool) -> &[String] {
    if unknown && !path.is_empty() {
        &path[..path.len() - 1]
    } else {
        path
    }
}

/// `jobs.hello.params`, or `top level` for the root.
pub(crate) fn dotted(path: &[String]) -> String {
    if path.is_empty() {
        "top level".to_owned()
    } else {
        path.join(".")
    }
}

fn segment_text(segment: &serde_path_to_error::Segment) -> String {
    use serde_path_to_error::Segment;
    match segment {
        Segment::Seq { index } => index.to_string(),
        Segment::Map { key } => key.clone(),
        Segment::Enum { variant } => variant.clone(),
        Segment::Unknown => "?".to_owned(),
    }
}

/// The text of a mapping key as the position index spells it.
pub(crate) fn key_text(key: &Value) -> Option<String> {
    match key {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn child<'a>(value: &'a mut Value, segment: &str) -> Option<&'a mut Value> {
    match value {
        Value::Mapping(mapping) => {
            mapping.iter_mut().find(|(k, _)| key_text(k).as_deref() == Some(segment)).map(|(_, v)| v)
        }
        Value::Sequence(items) => segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
        _ => None,
    }
}

fn node<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |node, segment| child(node, segment))
}

/// Drops the key at `path` from its mapping.
fn remove(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    match node(value, parent) {
        Some(Value::Mapping(mapping)) => {
            let key = mapping.keys().find(|k| key_text(k).as_deref() == Some(last.as_str())).cloned();
            key.is_some_and(|key| mapping.shift_remove(&key).is_some())
        }
        _ => false,
    }
}

/// Replaces the node at `path` with null, which every optional field reads as absent.
/// A node that is already null cannot be repaired this way.
fn blank(value: &mut Value, path: &[String]) -> bool {
    match node(value, path) {
        Some(found) if !found.is_null() => {
            *found = Value::Null;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        load_value(text).expect("test YAML parses")
    }

    fn path(p: &str) -> NodePath {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn repeated_keys_keep_the_first_value() {
        let value = yaml("a: 1\nb: 2\na: 3\n");
        assert_eq!(value, yaml("a: 1\nb: 2\n"));
    }

    #[test]
    fn tags_are_refused() {
        assert!(load_value("a: !shell 1\n").unwrap_err().to_string().contains("tags"));
    }

    #[test]
    fn numbers_and_booleans_read_as_text_where_text_is_wanted() {
        let mut problems = Vec::new();
        let param: RawParam = read(&yaml("default: 10\none_of: [10, 2.5, true, x]\n"), &[], &mut problems).unwrap();
        assert!(problems.is_empty());
        assert_eq!(param.default, Some(Scalar("10".into())));
        let one_of: Vec<String> = param.one_of.unwrap().into_iter().map(|s| s.0).collect();
        assert_eq!(one_of, ["10", "2.5", "true", "x"]);
    }

    #[test]
    fn a_required_field_of_the_wrong_type_is_one_problem() {
        let mut problems = Vec::new();
        let job: Option<RawJob> = read(&yaml("command: true\n"), &path("jobs.b"), &mut problems);
        assert!(job.is_none());
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages, ["jobs.b.command: invalid type: boolean `true`, expected a string"]);
    }

    #[test]
    fn every_problem_of_a_job_is_reported_and_the_rest_still_reads() {
        let mut problems = Vec::new();
        let value = yaml("command: x\ncomand: y\nconcurrency: -1\npriority: high\nretries: { max: 2, backof: 1s }\n");
        let job: RawJob = read(&value, &path("jobs.a"), &mut problems).unwrap();
        assert_eq!(job.command, "x");
        assert_eq!(job.retries.unwrap().max, Some(2));
        let found: Vec<(String, bool)> = problems.iter().map(|p| (p.path.join("."), p.at_key)).collect();
        assert_eq!(
            found,
            [
                ("jobs.a.comand".to_owned(), true),
                ("jobs.a.concurrency".to_owned(), false),
                ("jobs.a.priority".to_owned(), false),
                ("jobs.a.retries.backof".to_owned(), true),
            ]
        );
        assert!(problems[0].message.starts_with("jobs.a: unknown field `comand`"), "{}", problems[0].message);
        assert!(problems[1].message.starts_with("jobs.a.concurrency: invalid value: integer `-1`"));
    }

    #[test]
    fn a_misspelt_required_field_is_reported_once() {
        let mut problems = Vec::new();
        let read: Option<RawJob> = read(&yaml("comand: x\n"), &path("jobs.a"), &mut problems);
        assert!(read.is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("unknown field `comand`"));
    }

    #[test]
    fn a_missing_required_field_points_at_the_owner() {
        let mut problems = Vec::new();
        let read: Option<RawJob> = read(&yaml("shell: true\n"), &path("jobs.a"), &mut problems);
        assert!(read.is_none());
        assert_eq!(
            problems,
            [RawProblem { path: path("jobs.a"), at_key: true, message: "jobs.a: missing field `command`".into() }]
        );
    }

    #[test]
    fn one_or_many_and_follow_up_forms_keep_paths() {
        let mut problems = Vec::new();
        let value = yaml("after: shard\nthen: { job: merge, params: { n: 1 } }\n");
        let gate: RawGate = read(&value, &[], &mut problems).unwrap();
        assert!(matches!(gate.after, OneOrMany::One(ref s) if s == "shard"));
        assert!(matches!(gate.then, RawFollowUp::Full(ref f) if f.job == "merge"));
        let value = yaml("after: [a]\nthen: { job: merge, parms: {} }\n");
        let _: Option<RawGate> = read(&value, &[], &mut problems);
        assert_eq!(problems[0].path, path("then.parms"));
        assert!(problems[0].at_key);
    }
}
