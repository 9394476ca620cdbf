//! `params::validate`: every problem kind, defaults, required params, and that all problems
//! come back at once, sorted by param name.

use std::collections::BTreeMap;

use config::params::{validate, ParamError, ParamProblem, VALUE_MAX_BYTES};
use config::template::CommandTemplate;
use config::{JobDef, Mode, ParamSpec, Pattern, RetryPolicy};

/// A job built by hand (not through the loader) with the given params.
fn job(params: Vec<(&str, ParamSpec)>) -> JobDef {
    JobDef {
        name: "test".into(),
        command: CommandTemplate::parse_argv("true").unwrap(),
        params: params.into_iter().map(|(n, s)| (n.to_string(), s)).collect(),
        env: BTreeMap::new(),
        cwd: None,
        mode: Mode::Queue,
        timeout: None,
        retries: RetryPolicy::default(),
        concurrency: None,
        rate: None,
        priority: 0,
        unique: None,
        before: None,
        after: None,
        on_success: Vec::new(),
        on_failure: Vec::new(),
        schedules: Vec::new(),
        canonical: String::new(),
    }
}

fn pattern(source: &str) -> Pattern {
    Pattern { source: source.into(), regex: regex::Regex::new(&format!("^(?:{source})$")).unwrap() }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn problems(job: &JobDef, given: &[(&str, &str)]) -> Vec<(String, ParamProblem)> {
    match validate(job, &map(given)) {
        Err(errors) => errors.into_iter().map(|ParamError { param, problem }| (param, problem)).collect(),
        Ok(params) => panic!("expected errors, got {params:?}"),
    }
}

fn one(job: &JobDef, given: &[(&str, &str)]) -> ParamProblem {
    let mut all = problems(job, given);
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0).1
}

fn date_job() -> JobDef {
    job(vec![
        ("date", ParamSpec { required: true, pattern: Some(pattern(r"\d{4}_\d{2}_\d{2}")), ..Default::default() }),
        (
            "category",
            ParamSpec {
                default: Some("all".into()),
                one_of: Some(vec!["all".into(), "books".into(), "music".into()]),
                ..Default::default()
            },
        ),
        ("note", ParamSpec::default()),
    ])
}

#[test]
fn valid_params_pass_and_defaults_fill_in() {
    let job = date_job();
    let got = validate(&job, &map(&[("date", "2024_01_31")])).unwrap();
    // `note` is optional without a default: absent, not empty.
    assert_eq!(got, map(&[("date", "2024_01_31"), ("category", "all")]));
    let got = validate(&job, &map(&[("date", "2024_01_31"), ("category", "books"), ("note", "")])).unwrap();
    assert_eq!(got, map(&[("date", "2024_01_31"), ("category", "books"), ("note", "")]));
}

#[test]
fn undeclared_param_is_refused() {
    assert_eq!(one(&date_job(), &[("date", "2024_01_31"), ("rm", "x")]), ParamProblem::Undeclared);
}

#[test]
fn required_param_without_default_is_missing() {
    assert_eq!(problems(&date_job(), &[]), [("date".to_string(), ParamProblem::Missing)]);
}

#[test]
fn required_param_with_default_takes_the_default() {
    let job = job(vec![("x", ParamSpec { required: true, default: Some("d".into()), ..Default::default() })]);
    assert_eq!(validate(&job, &map(&[])).unwrap(), map(&[("x", "d")]));
}

#[test]
fn pattern_must_match_the_whole_value() {
    let job = date_job();
    let mismatch = ParamProblem::PatternMismatch { pattern: r"\d{4}_\d{2}_\d{2}".into() };
    assert_eq!(one(&job, &[("date", "2024_01_31; rm -rf /")]), mismatch);
    assert_eq!(one(&job, &[("date", "x2024_01_31")]), mismatch);
    assert_eq!(one(&job, &[("date", "")]), mismatch);
}

#[test]
fn one_of_lists_the_allowed_values() {
    let allowed = vec!["all".to_string(), "books".into(), "music".into()];
    let got = one(&date_job(), &[("date", "2024_01_31"), ("category", "Books")]);
    assert_eq!(got, ParamProblem::NotOneOf { allowed });
}

#[test]
fn control_characters_are_refused_with_their_byte_index() {
    let job = date_job();
    for (value, index, code) in
        [("a\0b", 1, 0), ("ab\n", 2, 0x0a), ("\t", 0, 9), ("é\u{7f}", 2, 0x7f), ("x\u{85}", 1, 0x85), ("\r\n", 0, 0x0d)]
    {
        let got = one(&job, &[("date", "2024_01_31"), ("note", value)]);
        assert_eq!(got, ParamProblem::ControlCharacter { index, code });
    }
    // Spaces, quotes and shell syntax are not control characters: quoting handles them.
    assert!(validate(&job, &map(&[("date", "2024_01_31"), ("note", "a b '$(x)' `y` ;|&")])).is_ok());
}

#[test]
fn values_longer_than_the_limit_are_refused() {
    let job = date_job();
    let at_limit = "x".repeat(VALUE_MAX_BYTES);
    assert!(validate(&job, &map(&[("date", "2024_01_31"), ("note", &at_limit)])).is_ok());
    let over = "é".repeat(VALUE_MAX_BYTES / 2 + 1);
    let got = one(&job, &[("date", "2024_01_31"), ("note", &over)]);
    assert_eq!(got, ParamProblem::TooLong { len: VALUE_MAX_BYTES + 2 });
}

#[test]
fn all_problems_are_reported_at_once_sorted_by_name() {
    let job = job(vec![
        ("b_missing", ParamSpec { required: true, ..Default::default() }),
        ("d_pattern", ParamSpec { pattern: Some(pattern("[a-z]+")), ..Default::default() }),
        ("c_choice", ParamSpec { one_of: Some(vec!["x".into()]), ..Default::default() }),
        ("f_fine", ParamSpec::default()),
        ("z_missing", ParamSpec { required: true, ..Default::default() }),
    ]);
    let long = "y".repeat(VALUE_MAX_BYTES + 1);
    let given = [
        ("a_undeclared", "1"),
        ("c_choice", "y"),
        ("d_pattern", "ABC"),
        ("e_undeclared", "2"),
        ("f_fine", "ok\u{1b}[31m"),
        ("y_undeclared", &long),
    ];
    let got = problems(&job, &given);
    let want = vec![
        ("a_undeclared".to_string(), ParamProblem::Undeclared),
        ("b_missing".into(), ParamProblem::Missing),
        ("c_choice".into(), ParamProblem::NotOneOf { allowed: vec!["x".into()] }),
        ("d_pattern".into(), ParamProblem::PatternMismatch { pattern: "[a-z]+".into() }),
        ("e_undeclared".into(), ParamProblem::Undeclared),
        ("f_fine".into(), ParamProblem::ControlCharacter { index: 2, code: 0x1b }),
        ("y_undeclared".into(), ParamProblem::Undeclared),
        ("z_missing".into(), ParamProblem::Missing),
    ];
    assert_eq!(got, want);
}

#[test]
fn errors_name_the_param_and_the_reason() {
    let err = ParamError { param: "date".into(), problem: ParamProblem::ControlCharacter { index: 3, code: 1 } };
    assert_eq!(err.to_string(), r#"param "date": contains the control character U+0001 at byte 3"#);
    // The pattern as the job file writes it, not escaped.
    let err =
        ParamError { param: "date".into(), problem: ParamProblem::PatternMismatch { pattern: r"^\d{4}$".into() } };
    assert_eq!(err.to_string(), r#"param "date": does not match the pattern `^\d{4}$`"#);
}
