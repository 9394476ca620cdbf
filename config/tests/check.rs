//! `config::parse` on files with mistakes: each problem is found, located at the
//! node it is about (`line:col`) and explained; several problems are all reported,
//! in file order. Also: the built-in example is valid, and a valid file becomes
//! the model it says.

use std::time::Duration;

use config::{parse, CatchUp, Mode, Rate, RetryPolicy, Scopes, StartScope};

/// Every problem of `text` as `(line:col, message)`, or a panic if the file is valid.
fn problems(text: &str) -> Vec<(String, String)> {
    match parse("test.yaml", text) {
        Ok(_) => panic!("expected problems, the file is valid:\n{text}"),
        Err(diagnostics) => diagnostics
            .problems
            .iter()
            .map(|p| (format!("{}:{}", p.location.line, p.location.column), p.message.clone()))
            .collect(),
    }
}

/// Asserts `text` has exactly one problem, at `at`, whose message contains `fragment`.
fn assert_one(text: &str, at: &str, fragment: &str) {
    let found = problems(text);
    assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
    assert_eq!(found[0].0, at, "wrong place for {:?}", found[0].1);
    assert!(found[0].1.contains(fragment), "{:?} does not contain {fragment:?}", found[0].1);
}

#[test]
fn malformed_yaml_is_reported_where_the_parser_stopped() {
    assert_one("jobs:\n  a:\n    command: echo\n   params: {}\n", "4:4", "invalid YAML");
}

#[test]
fn unknown_key_in_a_job_points_at_the_key() {
    let text = r#"jobs:
  a:
    command: echo hi
    timout: 1m
"#;
    assert_one(text, "4:5", "unknown field `timout`, expected one of `command`");
}

#[test]
fn unknown_key_inside_a_param_points_at_the_key() {
    let text = r#"jobs:
  a:
    command: echo {who}
    params:
      who: { requierd: true }
"#;
    assert_one(text, "5:14", "jobs.a.params.who: unknown field `requierd`");
}

#[test]
fn unknown_top_level_key() {
    assert_one("jobs:\n  a:\n    command: echo\njbos: {}\n", "4:1", "top level: unknown field `jbos`");
}

#[test]
fn follow_up_to_an_unknown_job_suggests_a_close_name() {
    let text = r#"jobs:
  build_index:
    command: echo index
  import:
    command: echo import
    on_success: [ build_indx ]
"#;
    assert_one(text, "6:19", "no job named `build_indx` (did you mean `build_index`?)");
}

#[test]
fn bad_regex_reports_the_regex_error() {
    let text = r#"jobs:
  a:
    command: echo {day}
    params:
      day: { pattern: '[0-9' }
"#;
    assert_one(text, "5:23", "`[0-9` is not a valid regular expression: unclosed character class");
}

#[test]
fn bad_cron_reports_croner_error_and_an_example() {
    let text = r#"jobs:
  a:
    command: echo
    schedule: { cron: "61 * * * *" }
"#;
    assert_one(text, "4:23", "`61 * * * *` is not a valid cron expression");
    assert!(problems(text)[0].1.contains("e.g. `0 3 * * *`"));
}

#[test]
fn unknown_time_zone_is_named() {
    let text = r#"jobs:
  a:
    command: echo
    schedule:
      - { cron: "0 3 * * *", timezone: Europe/Madird }
"#;
    assert_one(text, "5:40", "unknown time zone `Europe/Madird`");
}

#[test]
fn duplicate_job_names_name_both_lines() {
    let text = r#"jobs:
  a:
    command: echo one
  b:
    command: echo two
  a:
    command: echo three
"#;
    assert_one(text, "6:3", "job `a` is defined twice, at line 2 and again at line 6");
}

#[test]
fn duplicate_keys_do_not_hide_other_problems() {
    let text = r#"jobs:
  a:
    command: echo one
    command: echo two
  b:
    command: echo {nope}
"#;
    let found = problems(text);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0].0, "4:5");
    assert!(found[0].1.contains("key `command` is defined twice, at line 3 and again at line 4"));
    assert_eq!(found[1].0, "6:14");
}

#[test]
fn placeholder_naming_an_undeclared_param() {
    let text = r#"jobs:
  a:
    command: "echo {whom}"
    params:
      who: {}
"#;
    assert_one(text, "3:14", "`{whom}` names no declared param nor built-in (did you mean `{who}`?)");
}

#[test]
fn placeholders_in_env_unique_before_and_after_are_checked_too() {
    let text = r#"jobs:
  a:
    command: echo {job_id} {attempt} {run_id} {job_name}
    env: { X: "{x}" }
    unique: { key: "{y}" }
    before: echo {z}
    after: echo {exit_code}
"#;
    let found = problems(text);
    let at: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(at, ["4:15", "5:20", "6:13", "7:12"], "{found:#?}");
    assert!(found[3].1.contains("`{exit_code}` names no declared param"), "exit_code is only for follow-ups");
}

#[test]
fn a_unique_key_may_not_use_job_id_or_attempt_which_a_start_does_not_know_yet() {
    let text = r#"jobs:
  a:
    command: echo
    params: { date: {} }
    unique: { key: "{date}-{job_id}" }
  b:
    command: echo
    unique: { key: "{attempt}" }
  c:
    command: echo
    params: { date: {} }
    unique: { key: "{job_name}-{run_id}-{date}" }
"#;
    let found = problems(text);
    let at: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(at, ["5:20", "8:20"], "{found:#?}");
    assert!(found[0].1.contains("`{job_id}` is not known"), "{found:#?}");
    assert!(found[1].1.contains("`{attempt}` is not known"), "{found:#?}");
    assert!(found[0].1.contains("`{job_name}` and `{run_id}`"), "{found:#?}");
}

#[test]
fn follow_up_param_not_declared_on_the_target() {
    let text = r#"jobs:
  notify:
    command: echo {what}
    params: { what: {} }
  a:
    command: echo
    on_failure:
      - job: notify
        params: { waht: "{job_name} failed" }
"#;
    assert_one(text, "9:19", "job `notify` has no param `waht` (it declares: what)");
}

#[test]
fn follow_up_values_may_use_the_source_params_and_exit_code_only() {
    let text = r#"jobs:
  notify:
    command: echo {what}
    params: { what: {} }
  a:
    command: echo {day}
    params: { day: {} }
    on_failure: { job: notify, params: { what: "{day} {exit_code} {what}" } }
"#;
    assert_one(text, "8:48", "`{what}` names no declared param nor built-in");
}

#[test]
fn follow_up_that_never_sets_a_required_param() {
    let text = r#"jobs:
  notify:
    command: echo {what}
    params: { what: { required: true } }
  a:
    command: echo
    on_failure: [ notify ]
"#;
    assert_one(text, "7:19", "follow-up on_failure from `a` to `notify` never sets required param `what`");
}

#[test]
fn literal_follow_up_values_are_checked_against_the_target() {
    let text = r#"jobs:
  shard:
    command: echo {n}
    params: { n: { one_of: [1, 2] } }
  a:
    command: echo
    on_success: [ { job: shard, params: { n: "3" } } ]
"#;
    assert_one(text, "7:46", "`3` for job `shard`: must be one of [\"1\", \"2\"]");
}

#[test]
fn reserved_param_name() {
    let text = r#"jobs:
  a:
    command: echo
    params:
      wait: { default: "1" }
"#;
    assert_one(text, "5:7", "`wait` is reserved and cannot be a param name");
}

#[test]
fn a_reserved_param_is_not_offered_as_a_placeholder() {
    let text = r#"jobs:
  a:
    command: echo {x}
    params:
      wait: { default: "1" }
"#;
    let found = problems(text);
    assert_eq!(found.len(), 2, "{found:#?}");
    let (at, message) = &found[0];
    assert_eq!(at, "3:14", "{message}");
    assert!(message.contains("it may use: attempt, job_id, job_name, run_id"), "{message}");
    assert!(!message.contains("wait"), "a reserved name is no placeholder to use: {message}");
    assert!(found[1].1.contains("`wait` is reserved"), "{found:#?}");
}

#[test]
fn bad_param_and_job_names() {
    let text = r#"jobs:
  "my job":
    command: echo
    params:
      1st: {}
"#;
    let found = problems(text);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0].0, "2:3");
    assert!(found[0].1.contains("`my job` cannot be a job name"));
    assert_eq!(found[1].0, "5:7");
    assert!(found[1].1.contains("`1st` cannot be a param name"));
}

#[test]
fn bad_duration_shows_a_good_one() {
    let text = r#"jobs:
  a:
    command: echo
    timeout: 10
"#;
    assert_one(text, "4:14", "`10` has no unit: write e.g. `10s`");
}

#[test]
fn zero_timeout_and_ttl_are_refused_but_zero_backoff_is_fine() {
    let text = r#"jobs:
  a:
    command: echo
    timeout: 0s
    retries: { max: 2, backoff: 0s }
    unique: { key: "{job_name}", ttl: 0m }
"#;
    let found = problems(text);
    let at: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(at, ["4:14", "6:39"], "{found:#?}");
    assert!(found.iter().all(|(_, m)| m.contains("must be longer than 0s")));
}

#[test]
fn bad_rate() {
    let text = r#"jobs:
  a:
    command: echo
    rate: 50/day
"#;
    assert_one(text, "4:11", "`50/day` is not a rate: write a count per second, minute or hour, e.g. `50/s`");
}

#[test]
fn on_success_cycle_is_named_and_points_at_its_first_edge() {
    let text = r#"jobs:
  a:
    command: echo a
    on_success: [ b ]
  b:
    command: echo b
    on_success: [ c ]
    on_failure: [ a ]
  c:
    command: echo c
    on_success: [ a ]
"#;
    assert_one(text, "4:19", "on_success cycle `a` -> `b` -> `c` -> `a`");
    assert!(problems(text)[0].1.contains("use `retries`"));
}

#[test]
fn on_failure_loops_are_allowed() {
    let text = r#"jobs:
  a:
    command: echo a
    on_failure: [ b ]
  b:
    command: echo b
    on_success: [ a ]
"#;
    assert!(parse("test.yaml", text).is_ok());
}

#[test]
fn a_job_starting_itself_on_success_is_a_cycle_too() {
    let text = r#"jobs:
  again:
    command: echo
    on_success: again
"#;
    assert_one(text, "4:17", "`again` starts itself on success, an endless chain");
}

#[test]
fn a_cycle_through_a_gate_is_found() {
    let text = r#"jobs:
  shard:
    command: echo
  merge:
    command: echo
    on_success: [ shard ]
gates:
  done:
    after: shard
    then: merge
"#;
    assert_one(text, "6:19", "on_success cycle `merge` -> `shard` -> gate `done` -> `merge`");
}

#[test]
fn gate_after_an_unknown_job() {
    let text = r#"jobs:
  merge:
    command: echo
gates:
  done:
    after: [ shard ]
    then: merge
"#;
    assert_one(text, "6:14", "no job named `shard`");
}

#[test]
fn gate_key_must_use_params_of_every_upstream_job() {
    let text = r#"jobs:
  a:
    command: echo {date}
    params: { date: {} }
  b:
    command: echo
  merge:
    command: echo
gates:
  done:
    after: [ a, b ]
    key: "{date}"
    then: { job: merge }
"#;
    assert_one(text, "12:10", "`{date}` names no declared param nor built-in; it may use: run_id");
}

#[test]
fn default_not_matching_the_pattern() {
    let text = r#"jobs:
  a:
    command: echo {day}
    params:
      day: { default: 2026-01-01, pattern: '\d{4}_\d{2}_\d{2}' }
"#;
    assert_one(text, "5:23", "the default `2026-01-01` does not match the pattern");
}

#[test]
fn contradictory_param_specs() {
    let text = r#"jobs:
  a:
    command: echo {x} {y}
    params:
      x: { required: true, default: "1" }
      y: { pattern: "[a-z]+", one_of: [ a ] }
"#;
    let found = problems(text);
    let at: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(at, ["5:22", "6:7"], "{found:#?}");
    assert!(found[0].1.contains("`required: true` with a `default` is contradictory"));
    assert!(found[1].1.contains("has both `pattern` and `one_of`: use one of them"));
}

#[test]
fn template_syntax_error() {
    let text = r#"jobs:
  a:
    command: "echo {oops"
"#;
    assert_one(text, "3:14", "unclosed placeholder");
}

#[test]
fn missing_command_points_at_the_job() {
    assert_one("jobs:\n  a:\n    shell: true\n", "2:3", "jobs.a: missing field `command`");
}

#[test]
fn schedule_params_are_checked_like_a_start_request() {
    let text = r#"jobs:
  a:
    command: echo {day}
    params: { day: { required: true, pattern: '\d+' } }
    schedule:
      - { cron: "0 3 * * *", params: { day: x } }
      - { cron: "0 4 * * *", params: { day: "1", other: y } }
      - { cron: "0 5 * * *" }
"#;
    let found = problems(text);
    let at: Vec<&str> = found.iter().map(|(at, _)| at.as_str()).collect();
    assert_eq!(at, ["6:45", "7:50", "8:9"], "{found:#?}");
    assert!(found[0].1.contains("does not match the pattern"), "{found:#?}");
    assert!(found[1].1.contains("job `a` has no param `other`"), "{found:#?}");
    assert!(found[2].1.contains("never sets the required param `day`"), "{found:#?}");
}

#[test]
fn an_empty_file_has_no_jobs() {
    assert_one("", "1:1", "the file is empty");
    assert_one("jobs: {}\n", "1:1", "the file defines no jobs");
    assert_one("jobs:\n", "1:1", "the file defines no jobs");
    // A list where the jobs' mapping belongs is one problem, not also "no jobs".
    assert_one("jobs: []\n", "1:7", "expected a YAML mapping");
}

#[test]
fn every_mistake_is_reported_in_file_order() {
    let text = r#"jobs:
  hello:
    command: "echo hello, {whom}"
    params:
      who: { default: World, pattern: '[a-z]+' }
    timeout: soon
  a:
    command: echo
    comand: echo
    rate: 0/s
    on_success: [ nowhere ]
  b:
    command: echo
    schedule: { cron: "0 3 * * *", timezone: Mars/Olympus }
gates:
  g:
    after: [ a ]
    then: { job: hello, params: { who: "{nobody}", what: x } }
  h:
    after: ghost
    then: b
"#;
    let found = problems(text);
    let summary: Vec<(&str, &str)> =
        found.iter().map(|(at, m)| (at.as_str(), m.split_once(": ").map_or(m.as_str(), |(_, rest)| rest))).collect();
    let expected_at = ["3:14", "5:23", "6:14", "9:5", "10:11", "11:19", "14:46", "18:40", "18:52", "20:12"];
    let at: Vec<&str> = summary.iter().map(|(at, _)| *at).collect();
    assert_eq!(at, expected_at, "{summary:#?}");
    let fragments = [
        "`{whom}` names no declared param",
        "the default `World` does not match",
        "`soon` is not a duration",
        "unknown field `comand`",
        "would never dispatch anything",
        "no job named `nowhere`",
        "unknown time zone `Mars/Olympus`",
        "`{nobody}` names no declared param",
        "job `hello` has no param `what`",
        "no job named `ghost`",
    ];
    for ((_, message), fragment) in summary.iter().zip(fragments) {
        assert!(message.contains(fragment), "{message:?} does not contain {fragment:?}");
    }
}

#[test]
fn diagnostics_display_as_file_line_column() {
    let error = parse("jobz.yaml", "jobs:\n  a:\n    command: echo\n    rate: fast\n").unwrap_err();
    assert!(error.to_string().starts_with("jobz.yaml:4:11: jobs.a.rate: `fast` is not a rate"), "{error}");
}

#[test]
fn the_example_is_valid() {
    let file = parse("<embedded>", config::EXAMPLE_YAML).unwrap_or_else(|e| panic!("{e}"));
    for job in ["hello", "nightly_report", "fan_out", "shard", "merge", "publish", "flaky", "notify"] {
        assert!(file.jobs.contains_key(job), "the example lost `{job}`");
    }
    assert_eq!(file.jobs["fan_out"].on_success.len(), 4);
    assert_eq!(file.gates["all_shards_done"].count, Some(4));
}

#[test]
fn a_valid_file_becomes_the_model_it_describes() {
    let text = r#"jobs:
  import:
    command: "/opt/etl/import --date {date} --category {category}"
    params:
      date:     { required: true, pattern: '\d{4}_\d{2}_\d{2}' }
      category: { default: all, one_of: [ all, books, music ] }
      limit:    { default: 10 }
      note: ~
    env: { ETL_HOME: /opt/etl, LEVEL: 3 }
    cwd: /var/lib/etl
    mode: broadcast
    timeout: 2h
    retries: { max: 3, backoff: 1m30s }
    concurrency: 4
    rate: 50/s
    priority: -5
    unique: { key: "{date}-{category}", ttl: 24h }
    before: "/opt/etl/lock {date}"
    after: "/opt/etl/unlock {date}"
    on_success: [ index ]
    on_failure: [ { job: notify, params: { what: "{job_name} {job_id} {exit_code}" } } ]
    schedule:
      - { cron: "1 0 * * *", timezone: Europe/Madrid, params: { date: 2026_01_01 }, catch_up: none }
      - { cron: "*/30 * * * * *", params: { date: 2026_01_02 } }
  index:
    shell: true
    command: "echo indexing {date} >&2"
    params: { date: {} }
  notify:
    command: echo {what}
    params: { what: { required: true } }
gates:
  all_done:
    after: import
    count: 10
    key: "{date}"
    then: { job: index, params: { date: "{date}" } }
    timeout: 6h
    on_timeout: { job: notify, params: { what: "gate {gate} timed out on {key}" } }
    on_failure: { job: notify, params: { what: "gate {gate} {key}" } }
"#;
    let file = parse("jobz.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(file.origin, "jobz.yaml");
    let job = &file.jobs["import"];
    assert_eq!(job.name, "import");
    assert!(!job.command.is_shell());
    assert_eq!(job.command.placeholders(), ["date", "category"]);
    assert!(file.jobs["index"].command.is_shell());

    let date = &job.params["date"];
    assert!(date.required && date.default.is_none());
    let pattern = date.pattern.as_ref().expect("date has a pattern");
    assert!(pattern.is_full_match("2026_01_01") && !pattern.is_full_match("x2026_01_01"));
    assert_eq!(job.params["category"].default.as_deref(), Some("all"));
    assert_eq!(job.params["category"].one_of.as_deref(), Some(&["all".to_owned(), "books".into(), "music".into()][..]));
    assert_eq!(job.params["limit"].default.as_deref(), Some("10"));
    assert!(!job.params["note"].required && job.params["note"].pattern.is_none());

    assert_eq!(job.env["ETL_HOME"].source(), "/opt/etl");
    assert_eq!(job.env["LEVEL"].source(), "3");
    assert_eq!(job.cwd.as_deref(), Some(std::path::Path::new("/var/lib/etl")));
    assert_eq!(job.mode, Mode::Broadcast);
    assert_eq!(job.timeout, Some(Duration::from_secs(7200)));
    assert_eq!(job.retries, RetryPolicy { max: 3, backoff: Duration::from_secs(90) });
    assert_eq!(job.concurrency, Some(4));
    assert_eq!(job.rate, Some(Rate { count: 50, per: Duration::from_secs(1) }));
    assert_eq!(job.priority, -5);
    let unique = job.unique.as_ref().expect("unique");
    assert_eq!((unique.key.source(), unique.ttl), ("{date}-{category}", Duration::from_secs(86_400)));
    assert_eq!(job.before.as_ref().map(|c| c.source()), Some("/opt/etl/lock {date}"));
    assert_eq!(job.after.as_ref().map(|c| c.source()), Some("/opt/etl/unlock {date}"));

    assert_eq!(job.on_success.len(), 1);
    assert_eq!(job.on_success[0].job, "index");
    assert!(job.on_success[0].params.is_empty());
    assert_eq!(job.on_failure[0].job, "notify");
    assert_eq!(job.on_failure[0].params["what"].source(), "{job_name} {job_id} {exit_code}");

    assert_eq!(job.schedules.len(), 2);
    assert_eq!(job.schedules[0].cron.source, "1 0 * * *");
    assert_eq!(job.schedules[0].timezone, chrono_tz::Tz::Europe__Madrid);
    assert_eq!(job.schedules[0].params["date"], "2026_01_01");
    assert_eq!(job.schedules[0].catch_up, CatchUp::None);
    assert_eq!(job.schedules[1].timezone, chrono_tz::Tz::UTC);
    assert_eq!(job.schedules[1].catch_up, CatchUp::Latest);

    let notify = &file.jobs["notify"];
    assert_eq!(notify.mode, Mode::Queue);
    assert_eq!(notify.retries, RetryPolicy::default());
    assert_eq!((notify.priority, notify.timeout, notify.concurrency), (0, None, None));

    let gate = &file.gates["all_done"];
    assert_eq!(gate.name, "all_done");
    assert_eq!(gate.after, ["import"]);
    assert_eq!(gate.count, Some(10));
    assert_eq!(gate.key.as_ref().map(|k| k.source()), Some("{date}"));
    assert_eq!(gate.then.job, "index");
    assert_eq!(gate.then.params["date"].source(), "{date}");
    assert_eq!(gate.timeout, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(gate.on_timeout.as_ref().map(|f| f.job.as_str()), Some("notify"));
    assert_eq!(gate.on_timeout.as_ref().map(|f| f.params.len()), Some(1));
    assert_eq!(gate.on_failure.as_ref().map(|f| f.params["what"].source()), Some("gate {gate} {key}"));
}

#[test]
fn canonical_text_ignores_key_order_layout_and_comments() {
    let one = "jobs:\n  a:\n    command: echo {x}\n    params: { x: { default: 10 } }\n    timeout: 1m\n";
    let two = "jobs:\n  a:   # the same job\n    timeout: \"1m\"\n    params:\n      x:\n        default: '10'\n    command: 'echo {x}'\n";
    let three = "jobs:\n  a:\n    command: echo {x}\n    params: { x: { default: 11 } }\n    timeout: 1m\n";
    let canonical = |text: &str| parse("t.yaml", text).unwrap_or_else(|e| panic!("{e}")).jobs["a"].canonical.clone();
    assert_eq!(canonical(one), canonical(two));
    assert_ne!(canonical(one), canonical(three));
}

#[test]
fn deeply_nested_yaml_is_an_error_not_a_crash() {
    let text = format!("jobs:\n  a:\n    command: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].1.contains("recursion limit"), "{found:#?}");
}

const HASH_A: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const HASH_B: &str = "sha256:60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752";

#[test]
fn tokens_become_hashes_with_scopes() {
    let text = format!(
        r#"jobs:
  a: {{ command: "true" }}
  b: {{ command: "true" }}
tokens:
  cron: {{ hash: "{HASH_A}", scopes: [ {{ start: [a] }}, read ] }}
  ops:
    hash: "{HASH_B}"
    scopes: [ start, read, admin ]
  viewer: {{ hash: "sha256:{}", scopes: read }}
"#,
        "0".repeat(64)
    );
    let file = parse("t.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let cron = &file.tokens["cron"];
    assert_eq!(cron.name, "cron");
    assert_eq!(cron.sha256[..2], [0x9f, 0x86]);
    assert_eq!(cron.scopes.start, Some(StartScope::Only(["a".to_owned()].into())));
    assert!(cron.scopes.read && !cron.scopes.admin);
    assert!(cron.scopes.start.as_ref().is_some_and(|s| s.allows("a") && !s.allows("b")));
    let ops = &file.tokens["ops"];
    assert_eq!(ops.sha256[31], 0x52, "upper-case hex reads too");
    assert_eq!(ops.scopes, Scopes { start: Some(StartScope::Any), read: true, admin: true });
    assert_eq!(file.tokens["viewer"].scopes, Scopes { start: None, read: true, admin: false });
    assert!(parse("t.yaml", "jobs:\n  a: { command: \"true\" }\n").unwrap().tokens.is_empty());
}

#[test]
fn a_bad_token_hash_is_located_and_explained() {
    let text = "jobs:\n  a: { command: \"true\" }\ntokens:\n  t: { hash: \"md5:abc\", scopes: [read] }\n";
    assert_one(text, "4:14", "tokens.t.hash: is not a token hash: write `sha256:`");
    let text = "jobs:\n  a: { command: \"true\" }\ntokens:\n  t: { hash: \"sha256:abc\", scopes: [read] }\n";
    assert_one(text, "4:14", "not 64 hex digits");
    let text = "jobs:\n  a: { command: \"true\" }\ntokens:\n  t: { hash: \"sha256:zz\", scopes: [read] }\n";
    assert_one(text, "4:14", "jobz token");
}

#[test]
fn unknown_scopes_jobs_and_keys_of_a_token_are_refused() {
    let head = format!("jobs:\n  import: {{ command: \"true\" }}\ntokens:\n  t:\n    hash: \"{HASH_A}\"\n");
    assert_one(
        &format!("{head}    scopes: [ read, write ]\n"),
        "6:21",
        "unknown scope `write`: use `start`, `read`, `admin`",
    );
    assert_one(
        &format!("{head}    scopes: [ {{ start: [ imprt ] }} ]\n"),
        "6:26",
        "no job named `imprt` (did you mean `import`?)",
    );
    assert_one(&format!("{head}    scopes: [ start, {{ start: [import] }} ]\n"), "6:22", "`start` is given twice");
    assert_one(&format!("{head}    scopes: []\n"), "6:13", "is empty");
    assert_one(&format!("{head}    scopes: [read]\n    secret: x\n"), "7:5", "unknown field `secret`");
    assert_one(&format!("{head}\n"), "4:3", "missing field `scopes`");
}

#[test]
fn two_tokens_with_one_hash_are_refused() {
    let text = format!(
        "jobs:\n  a: {{ command: \"true\" }}\ntokens:\n  one: {{ hash: \"{HASH_A}\", scopes: [read] }}\n  two: {{ hash: \"{HASH_A}\", scopes: [admin] }}\n"
    );
    assert_one(&text, "5:16", "the same hash as token `one`");
}
