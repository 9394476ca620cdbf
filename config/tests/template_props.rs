//! Property tests for SPEC "Running a command safely": no value can add, remove or split an
//! argv word, and in shell mode a real `/bin/sh` (and bash, when installed) sees every value as
//! literal text, whatever it holds. Nothing a value holds may create a file.

use std::path::Path;
use std::process::Command;

use config::template::{CommandTemplate, QuoteContext, Values};
use proptest::collection::vec;
use proptest::prelude::*;

const NAMES: [&str; 3] = ["a", "b_2", "_c"];

/// Shell syntax that has broken quoting somewhere, alone or combined.
const FRAGMENTS: &[&str] = &[
    "'",
    "\"",
    "\\",
    "$",
    "$(",
    ")",
    "`",
    "\n",
    "\t",
    "\r",
    ";",
    "&",
    "&&",
    "|",
    "||",
    "*",
    "?",
    "[",
    "]",
    "{",
    "}",
    "{x}",
    "}{",
    "~",
    "#",
    "!",
    "-",
    "--",
    "-rf",
    " ",
    "<",
    ">",
    ">>",
    "<<",
    "%",
    "%s",
    "=",
    "$'",
    "${",
    "$((",
    "'\\''",
    "\u{1b}",
    "\u{7f}",
    "\u{85}",
    "é",
    "ā",
    "touch pwned",
    "$HOME",
];

/// Fixed hostile values: each would create `pwned` if it ever became code.
const HOSTILE: &[&str] = &[
    "; touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "'; touch pwned; '",
    "\"; touch pwned; \"",
    "\n touch pwned",
    "*",
    "-rf",
    "{x}",
    "}{",
    "a && touch pwned",
    "| touch pwned",
    "> pwned",
    "'$(touch pwned)'",
    "\\'; touch pwned #",
    "\"$(touch pwned)\"",
    "\\\"; touch pwned; \\\"",
    "",
];

/// Any string without NUL (an argv cannot hold one): printable text, or shell syntax fragments.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC*",
        vec(prop_oneof![proptest::sample::select(FRAGMENTS).prop_map(str::to_string), "\\PC{0,3}"], 0..10)
            .prop_map(|parts| parts.concat()),
    ]
}

fn hostile() -> impl Strategy<Value = String> {
    vec(proptest::sample::select(FRAGMENTS), 1..8).prop_map(|parts| parts.concat())
}

fn values(value: &str) -> Values {
    [("v".to_string(), value.to_string())].into()
}

/// Runs a filled argv in `dir` and returns its stdout; the program must succeed.
fn run(argv: &[String], dir: &Path) -> Vec<u8> {
    let out = Command::new(&argv[0]).args(&argv[1..]).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The shells to run a shell-mode argv with: `/bin/sh` as filled, and bash if present, because
/// bash (the `/bin/sh` of some systems) reads more syntax, such as `$'...'`.
fn shells(argv: &[String]) -> Vec<Vec<String>> {
    let mut all = vec![argv.to_vec()];
    if Path::new("/bin/bash").exists() {
        let mut bash = argv.to_vec();
        bash[0] = "/bin/bash".into();
        bash.insert(1, "--posix".into());
        all.push(bash);
    }
    all
}

fn assert_empty(dir: &Path, value: &str) {
    let entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(entries.is_empty(), "value {value:?} created {entries:?}");
}

// ---- argv mode ----

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Placeholder(usize),
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        // Anything but NUL, including spaces, quotes, `#` and braces: the word is quoted below.
        "[a-zA-Z0-9 '\"\\\\$;*#\n\t.{}é-]{1,5}".prop_map(Segment::Literal),
        (0..NAMES.len()).prop_map(Segment::Placeholder),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn argv_values_never_change_the_words(
        words in vec(vec(segment(), 1..4), 1..6),
        vals in (any::<String>(), value(), hostile()).prop_map(|(a, b, c)| [a, b, c]),
    ) {
        let values: Values = NAMES.iter().zip(&vals).map(|(n, v)| (n.to_string(), v.clone())).collect();
        // Each word as template text (braces doubled), quoted as shell words, then joined.
        let text = |w: &Vec<Segment>| -> String {
            w.iter()
                .map(|s| match s {
                    Segment::Literal(l) => l.replace('{', "{{").replace('}', "}}"),
                    Segment::Placeholder(i) => format!("{{{}}}", NAMES[*i]),
                })
                .collect()
        };
        let source = words.iter().map(|w| shell_words::quote(&text(w)).into_owned()).collect::<Vec<_>>().join(" ");
        let expected: Vec<String> = words
            .iter()
            .map(|w| {
                w.iter()
                    .map(|s| match s {
                        Segment::Literal(l) => l.as_str(),
                        Segment::Placeholder(i) => vals[*i].as_str(),
                    })
                    .collect()
            })
            .collect();
        let command = CommandTemplate::parse_argv(&source).unwrap();
        let placeholders = words.iter().flatten().filter(|s| matches!(s, Segment::Placeholder(_))).count();
        prop_assert_eq!(command.placeholders().len(), placeholders);
        let argv = command.fill(&values).unwrap();
        prop_assert_eq!(argv.len(), words.len());
        prop_assert_eq!(argv, expected);
    }
}

// ---- shell mode, through a real shell ----

/// Shell scripts and what they must print for a value `v`.
/// What a script must print for a given value.
type Expected = fn(&str) -> String;

fn scripts() -> Vec<(&'static str, Expected)> {
    vec![
        ("printf %s {v}", |v| v.to_string()),
        (r#"printf %s "{v}""#, |v| v.to_string()),
        ("printf %s '{v}'", |v| v.to_string()),
        ("printf %s x{v}y", |v| format!("x{v}y")),
        (r#"printf %s "a{v}b" 'c{v}d' e"{v}"'f'"#, |v| format!("a{v}bc{v}de{v}f")),
        ("# it's a comment {v}\nprintf %s {v} # don't", |v| v.to_string()),
        // `$(...)` strips trailing newlines; the `.` keeps them.
        (r#"x=$(printf %s "{v}".); printf %s "${{x%.}}""#, |v| v.to_string()),
        (r#"printf %s "$(printf %s '{v}' {v})""#, |v| format!("{v}{v}").trim_end_matches('\n').to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn shell_prints_every_value_verbatim(v in value()) {
        let dir = tempfile::tempdir().unwrap();
        for (script, expected) in scripts() {
            let argv = CommandTemplate::parse_shell(script).unwrap().fill(&values(&v)).unwrap();
            prop_assert_eq!(&argv[..2], ["/bin/sh", "-c"]);
            for shell in shells(&argv) {
                let out = run(&shell, dir.path());
                prop_assert_eq!(String::from_utf8_lossy(&out), expected(&v), "{:?} in {:?}", v, shell);
            }
        }
        assert_empty(dir.path(), &v);
    }

    #[test]
    fn no_generated_value_creates_a_file(v in hostile()) {
        check_no_file_created(&v);
    }
}

#[test]
fn no_hostile_value_creates_a_file() {
    for v in HOSTILE {
        check_no_file_created(v);
    }
}

/// Runs `v` through argv mode (`echo`, `printf`) and shell mode (each quoting context) in a
/// fresh directory: the output is the value, and the directory stays empty.
fn check_no_file_created(v: &str) {
    let dir = tempfile::tempdir().unwrap();
    let values = values(v);
    let echo = CommandTemplate::parse_argv("echo {v}").unwrap().fill(&values).unwrap();
    assert_eq!(echo.len(), 2);
    // `echo` reads options and escapes; only compare where the value cannot be one.
    if !v.starts_with('-') && !v.contains('\\') {
        assert_eq!(String::from_utf8_lossy(&run(&echo, dir.path())), format!("{v}\n"));
    } else {
        run(&echo, dir.path());
    }
    let printf = CommandTemplate::parse_argv("printf %s {v}").unwrap().fill(&values).unwrap();
    assert_eq!(String::from_utf8_lossy(&run(&printf, dir.path())), v);
    for script in ["printf %s {v}", "printf %s '{v}'", r#"printf %s "{v}""#, r#"printf %s "$(printf %s {v}.)""#] {
        let argv = CommandTemplate::parse_shell(script).unwrap().fill(&values).unwrap();
        let expected = if script.contains('.') { format!("{v}.") } else { v.to_string() };
        for shell in shells(&argv) {
            assert_eq!(String::from_utf8_lossy(&run(&shell, dir.path())), expected, "{v:?} in {shell:?}");
        }
    }
    assert_empty(dir.path(), v);
}

/// A script that would run a value as code if the lexer mistook its context is refused at load
/// time instead; check that each refusal covers what a real shell would have done.
#[test]
fn refused_scripts_would_have_run_the_value() {
    use QuoteContext::*;
    let dir = tempfile::tempdir().unwrap();
    // The script, the context a naive lexer would see there, and a value that then runs `touch`
    // in the given shell (dash refuses the backquote one as a whole; bash runs it).
    for (shell, script, naive, value) in [
        ("/bin/sh", r#"printf %s "${v}""#, DoubleQuoted, "(touch pwned)"),
        ("/bin/sh", r"printf %s \{v}", Unquoted, "; touch pwned #"),
        ("/bin/sh", r#"printf %s "\{v}""#, DoubleQuoted, "$(touch pwned)"),
        ("/bin/sh", "# it's\nprintf %s {v} # '", SingleQuoted, "; touch pwned;"),
        ("/bin/bash", "printf %s `printf %s {v}`", Unquoted, "x`;touch pwned;`x"),
        ("/bin/bash", "printf %s $'{v}'", SingleQuoted, "\\'; touch pwned #"),
    ] {
        if !Path::new(shell).exists() {
            continue;
        }
        match CommandTemplate::parse_shell(script) {
            // The comment row is accepted: the lexer knows the `'` quotes nothing.
            Ok(command) => {
                assert!(script.starts_with('#'), "{script:?} was accepted");
                let argv = command.fill(&values(value)).unwrap();
                assert_eq!(String::from_utf8_lossy(&run(&argv, dir.path())), value);
                assert_empty(dir.path(), value);
            }
            Err(err) => assert!(!script.starts_with('#'), "{script:?}: {err}"),
        }
        let filled = script.replace("{v}", &naive.quote(value));
        // Some of these end in a syntax error after the damage is done; only the file matters.
        let out = Command::new(shell).args(["-c", &filled]).current_dir(dir.path()).output().unwrap();
        assert!(dir.path().join("pwned").exists(), "{filled:?} did not show the danger: {out:?}");
        std::fs::remove_file(dir.path().join("pwned")).unwrap();
    }
}
