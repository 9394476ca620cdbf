//! How the client commands show things: tables, key/value views, the
//! `--wait` progress line, and JSON pretty-printed without reordering.

use std::time::Duration;

use broker::http::wire::{AttemptView, JobView, ProgressView};
use chrono::{DateTime, SecondsFormat, Utc};
use jobz_core::Status;

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.push('\n');
    }
    text
}

/// A time to the second, or `-`.
pub fn time(time: Option<&DateTime<Utc>>) -> String {
    time.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// How long ago `then` was, e.g. `3s ago`, `5m ago`.
pub fn ago(then: &DateTime<Utc>, now: &DateTime<Utc>) -> String {
    let seconds = (*now - *then).num_seconds();
    match seconds {
        s if s < 0 => "just now".to_owned(),
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// `42% copying`, or empty without progress.
pub fn progress(progress: Option<&ProgressView>) -> String {
    match progress {
        None => String::new(),
        Some(p) => match &p.message {
            Some(message) if !message.is_empty() => format!("{}% {message}", p.percent.round()),
            _ => format!("{}%", p.percent.round()),
        },
    }
}

/// A duration as `12.3s`, `4m05s` or `1h02m`.
pub fn elapsed(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        s if s < 60 => format!("{:.1}s", duration.as_secs_f64()),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The readable view of `jobz status`: one `key  value` line per field, then the attempts
/// and the output tail.
pub fn job(view: &JobView) -> String {
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let mut status = view.status.to_string();
    let progress = progress(view.progress.as_ref());
    if !progress.is_empty() {
        status = format!("{status} {progress}");
    }
    let params = if view.params.is_empty() {
        "-".to_owned()
    } else {
        view.params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("id", view.id.clone()),
        ("job", view.job_name.clone()),
        ("status", status),
        ("params", params),
        ("run", view.run_id.clone()),
        ("parent", dash(view.parent_id.clone())),
        ("worker", dash(view.worker.clone())),
        ("attempts", view.attempts.to_string()),
        ("exit code", dash(view.exit_code.map(|c| c.to_string()))),
    ];
    if let Some(signal) = view.signal {
        rows.push(("signal", signal.to_string()));
    }
    if let Some(error) = &view.error {
        rows.push(("error", error.clone()));
    }
    if view.origin.kind != "start" {
        let mut origin = view.origin.kind.clone();
        if let (Some(gate), Some(key)) = (&view.origin.gate, &view.origin.key) {
            origin = format!("{origin} {gate} key {key}");
        }
        rows.push(("origin", origin));
    }
    rows.extend([
        ("created", time(Some(&view.created_at))),
        ("queued", time(view.queued_at.as_ref())),
        ("started", time(view.started_at.as_ref())),
        ("finished", time(view.finished_at.as_ref())),
    ]);
    if view.cancelled_at.is_some() {
        rows.push(("cancelled", time(view.cancelled_at.as_ref())));
    }
    if view.not_before.is_some() {
        rows.push(("retry at", time(view.not_before.as_ref())));
    }
    if let Some(hold) = &view.held_by {
        rows.push(("held by", hold.message.clone()));
    }
    let mut text = String::new();
    for (key, value) in rows {
        text.push_str(&format!("{key:<10} {value}\n"));
    }
    if let Some(attempts) = view.attempt_list.as_ref().filter(|a| !a.is_empty()) {
        text.push_str("attempt list\n");
        for attempt in attempts {
            text.push_str(&format!("  {}\n", attempt_line(attempt)));
        }
    }
    if !view.output.is_empty() {
        text.push_str("output\n");
        text.push_str(&view.output);
        if !view.output.ends_with('\n') {
            text.push('\n');
        }
    }
    text
}

fn attempt_line(attempt: &AttemptView) -> String {
    let status = attempt.status.map_or("running", Status::as_str);
    let mut line = format!(
        "#{} on {} {} → {} {status}",
        attempt.attempt,
        attempt.worker,
        time(Some(&attempt.started_at)),
        time(attempt.finished_at.as_ref())
    );
    if let Some(code) = attempt.exit_code {
        line.push_str(&format!(" exit {code}"));
    }
    if attempt.stale {
        line.push_str(" (stale result, ignored)");
    }
    line
}

/// The `--wait` line: `queued → running 42% message (12.3s)`.
pub fn wait_line(trail: &[Status], progress_text: &str, took: Duration) -> String {
    let trail = trail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" → ");
    if progress_text.is_empty() {
        format!("{trail} ({})", elapsed(took))
    } else {
        format!("{trail} {progress_text} ({})", elapsed(took))
    }
}

/// Cuts `line` to at most `width` characters, so that a terminal line never wraps
/// (a wrapped line cannot be redrawn in place).
pub fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Pretty-prints valid JSON text keeping its keys in the server's order (a parse into
/// `serde_json::Value` would sort them). Anything that is not valid JSON comes back as it is.
pub fn pretty_json(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    if serde_json::from_str::<serde_json::Value>(&text).is_err() {
        return text.into_owned();
    }
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                // Skip whitespace to see whether the container is empty.
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    if let Some(close) = chars.next() {
                        out.push(close);
                    }
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// `item[key]` when it is a string, else `-`.
fn text(item: &serde_json::Value, key: &str) -> String {
    item.get(key).and_then(|v| v.as_str()).unwrap_or("-").to_owned()
}

/// `item[key]` as an RFC 3339 time to the second, or `-`.
fn when(item: &serde_json::Value, key: &str) -> String {
    let parsed = item.get(key).and_then(|v| v.as_str()).and_then(|t| DateTime::parse_from_rfc3339(t).ok());
    time(parsed.map(|t| t.with_timezone(&Utc)).as_ref())
}

/// `jobz schedules`: one row per schedule from `GET /schedules`, times to the second.
pub fn schedules_table(items: &[serde_json::Value]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            let params: Vec<String> = item
                .get("params")
                .and_then(|p| p.as_object())
                .map(|p| p.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect())
                .unwrap_or_default();
            vec![
                text(item, "job_name"),
                text(item, "cron"),
                text(item, "timezone"),
                if params.is_empty() { "-".to_owned() } else { params.join(" ") },
                text(item, "catch_up"),
                when(item, "next"),
                when(item, "last_fired"),
                text(item, "last_job_id"),
            ]
        })
        .collect();
    table(&["JOB", "CRON", "TIMEZONE", "PARAMS", "CATCH-UP", "NEXT", "LAST FIRED", "LAST JOB"], &rows)
}

/// `jobz gates`: a row per key of each gate, open keys first with their
/// progress, then the fired, timed-out and failed ones with the job each fire
/// started (or why it could not); a gate with no keys yet has a row of its own.
/// `None` when an item is not a gate as `GET /gates` shows one.
pub fn gates_table(items: &[serde_json::Value]) -> Option<String> {
    let mut rows = Vec::new();
    for gate in items {
        let name = gate.get("name")?.as_str()?;
        let before = rows.len();
        for open in gate.get("open")?.as_array()? {
            let failed = open.get("failed").and_then(|f| f.as_bool()).unwrap_or(false);
            let state = if failed { "open, upstream failed" } else { "open" };
            rows.push(vec![
                name.to_owned(),
                text(open, "key"),
                state.to_owned(),
                text(open, "progress"),
                when(open, "opened_at"),
                "-".to_owned(),
            ]);
        }
        for (list, state) in [("fired", "fired"), ("timed_out", "timed out"), ("failed", "failed")] {
            for fire in gate.get(list)?.as_array()? {
                let started = match fire.get("error").and_then(|e| e.as_str()) {
                    Some(error) => format!("not started: {error}"),
                    None => text(fire, "job_id"),
                };
                rows.push(vec![
                    name.to_owned(),
                    text(fire, "key"),
                    state.to_owned(),
                    "-".to_owned(),
                    when(fire, "at"),
                    started,
                ]);
            }
        }
        if rows.len() == before {
            let after: Vec<&str> = gate.get("after")?.as_array()?.iter().filter_map(|a| a.as_str()).collect();
            rows.push(vec![
                name.to_owned(),
                "-".to_owned(),
                format!("waiting for {}", after.join(", ")),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            ]);
        }
    }
    Some(table(&["GATE", "KEY", "STATE", "PROGRESS", "SINCE/AT", "JOB"], &rows))
}

/// Keys that name a row; they lead a table, in this order.
const NAMING_COLUMNS: [&str; 6] = ["id", "name", "gate", "job", "job_name", "key"];

/// Rows of a list of JSON objects, or `None` if an item is not an object. The columns are
/// every key seen: the naming ones first, then the rest in alphabetical order (the parsed
/// JSON does not keep the server's order). Strings are shown as they are, `null` as `-`,
/// anything else as compact JSON.
pub fn object_table(items: &[serde_json::Value]) -> Option<String> {
    let mut seen = std::collections::BTreeSet::new();
    for item in items {
        seen.extend(item.as_object()?.keys().cloned());
    }
    let mut columns: Vec<String> =
        NAMING_COLUMNS.iter().filter(|c| seen.contains(**c)).map(|c| (*c).to_owned()).collect();
    columns.extend(seen.into_iter().filter(|c| !NAMING_COLUMNS.contains(&c.as_str())));
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            columns
                .iter()
                .map(|column| match item.get(column) {
                    None | Some(serde_json::Value::Null) => "-".to_owned(),
                    Some(serde_json::Value::String(text)) => text.clone(),
                    Some(other) => other.to_string(),
                })
                .collect()
        })
        .collect();
    let header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    Some(table(&header, &rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_leave_the_last_unpadded() {
        let text = table(&["ID", "JOB"], &[vec!["a".into(), "hello".into()], vec!["long-id".into(), "x".into()]]);
        assert_eq!(text, "ID       JOB\na        hello\nlong-id  x\n");
    }

    #[test]
    fn pretty_json_keeps_key_order_and_strings_intact() {
        let raw = br#"{"id":"j","b":[1,{"x":"a, b: {c}"}],"e":{},"f":[],"g":"q\"{"}"#;
        let pretty = pretty_json(raw);
        assert!(
            pretty.starts_with("{\n  \"id\": \"j\",\n  \"b\": [\n    1,\n    {\n      \"x\": \"a, b: {c}\"\n"),
            "{pretty}"
        );
        assert!(pretty.contains("\"e\": {},\n  \"f\": [],\n  \"g\": \"q\\\"{\"\n}"), "{pretty}");
        let reparsed: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(reparsed, serde_json::from_slice::<serde_json::Value>(raw).unwrap());
        assert_eq!(pretty_json(b"not json"), "not json");
    }

    #[test]
    fn the_wait_line_shows_the_trail_progress_and_time() {
        let line = wait_line(&[Status::Queued, Status::Running], "42% copying", Duration::from_millis(12_340));
        assert_eq!(line, "queued → running 42% copying (12.3s)");
        assert_eq!(wait_line(&[Status::Queued], "", Duration::from_secs(65)), "queued (1m05s)");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
    }

    #[test]
    fn object_lists_become_tables_with_naming_keys_first() {
        let items = vec![serde_json::json!({"gate": "g", "open": 2}), serde_json::json!({"gate": "h", "fired": null})];
        assert_eq!(object_table(&items).unwrap(), "GATE  FIRED  OPEN\ng     -      2\nh     -      -\n");
        assert_eq!(object_table(&[serde_json::json!(1)]), None);
    }

    #[test]
    fn ages_read_naturally() {
        let now = Utc::now();
        assert_eq!(ago(&(now - chrono::Duration::seconds(3)), &now), "3s ago");
        assert_eq!(ago(&(now - chrono::Duration::minutes(5)), &now), "5m ago");
        assert_eq!(ago(&(now + chrono::Duration::seconds(3)), &now), "just now");
    }
}
