//! Where each node of a YAML document sits in its text.
//!
//! `serde_yaml` turns text into values but forgets positions once a value is
//! built, and our checks run on values. So the text is walked a second time
//! with yaml-rust2's event parser, which reports a marker for every event, and
//! the position of every node is recorded under its path (`jobs.hello.params`).
//! A diagnostic found anywhere then looks its path up here. The walk also finds
//! duplicate keys, which `serde_yaml` would reject as a whole-file error without
//! saying where the first one was.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

use crate::{Diagnostic, Location};

/// How deep collections may nest before the walk gives up (serde_yaml refuses deeper ones too).
const NESTING_MAX: usize = 128;

/// A path from the root to a node: mapping keys as written, sequence indexes in decimal.
pub(crate) type NodePath = Vec<String>;

/// The position of one node: of its key (when it is a mapping value) and of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spot {
    key: Option<Location>,
    value: Location,
}

/// Positions of every node of the first document, by path.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    spots: HashMap<NodePath, Spot>,
    /// Every key that repeats an earlier key of the same mapping.
    pub(crate) duplicates: Vec<Diagnostic>,
}

impl Positions {
    /// Walks `text`. A syntax error stops the walk; `serde_yaml` reports it, and the
    /// positions found before it stay usable.
    pub(crate) fn index(text: &str) -> Positions {
        let lines = text.split('\n').collect();
        let parser = Parser::new_from_str(text);
        let mut walker = Walker { lines, parser, positions: Positions::default(), depth: 0 };
        // A syntax error ends the walk early; the YAML parse reports it with its location.
        let _ = walker.document();
        walker.positions
    }

    /// Where the value at `path` is; for a node not found (for example, one merged in
    /// with `<<`), the nearest ancestor that is.
    pub(crate) fn value(&self, path: &[String]) -> Location {
        self.nearest(path).map_or(Location { line: 1, column: 1 }, |s| s.value)
    }

    /// Where the key of the node at `path` is, or its value when it has no key.
    pub(crate) fn key(&self, path: &[String]) -> Location {
        self.nearest(path).map_or(Location { line: 1, column: 1 }, |s| s.key.unwrap_or(s.value))
    }

    /// Every recorded path ending in `name`, in file order (used to find `<<` merge keys).
    pub(crate) fn keys_named(&self, name: &str) -> Vec<Location> {
        let mut found: Vec<Location> = self
            .spots
            .iter()
            .filter(|(path, _)| path.last().is_some_and(|last| last == name))
            .filter_map(|(_, spot)| spot.key)
            .collect();
        found.sort();
        found
    }

    fn nearest(&self, path: &[String]) -> Option<&Spot> {
        (0..=path.len()).rev().find_map(|n| self.spots.get(&path[..n]))
    }
}

fn location(marker: &Marker) -> Location {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Location { line: marker.line(), column: marker.col() + 1 }
}

/// The syntax error that ended a walk; only used to stop early.
struct Stop;

struct Walker<'a> {
    lines: Vec<&'a str>,
    parser: Parser<std::str::Chars<'a>>,
    positions: Positions,
    /// How many collections the current node is inside of.
    depth: usize,
}

impl Walker<'_> {
    fn next(&mut self) -> Result<(Event, Marker), Stop> {
        self.parser.next_token().map_err(|_| Stop)
    }

    fn peek(&mut self) -> Result<(Event, Marker), Stop> {
        self.parser.peek().map(|(event, marker)| (event.clone(), *marker)).map_err(|_| Stop)
    }

    /// Whether `marker` sits on the `{` or `[` of a flow collection. Block collections
    /// have no such character: their start marker points past the parent's colon.
    fn opens_flow(&self, marker: &Marker) -> bool {
        let line = self.lines.get(marker.line().saturating_sub(1)).copied().unwrap_or_default();
        matches!(line.chars().nth(marker.col()), Some('{' | '['))
    }

    fn document(&mut self) -> Result<(), Stop> {
        loop {
            let (event, _) = self.peek()?;
            match event {
                Event::StreamStart | Event::DocumentStart => {
                    self.next()?;
                }
                Event::StreamEnd | Event::DocumentEnd => return Ok(()),
                _ => return self.node(&mut Vec::new(), None, true),
            }
        }
    }

    /// Walks one node (and its children), recording positions when `record` is set.
    /// Nodes under a duplicate key are walked but not recorded, so the first definition keeps its positions.
    fn node(&mut self, path: &mut NodePath, key: Option<Location>, record: bool) -> Result<(), Stop> {
        if self.depth >= NESTING_MAX {
            return Err(Stop);
        }
        self.depth += 1;
        let walked = self.node_inner(path, key, record);
        self.depth -= 1;
        walked
    }

    fn node_inner(&mut self, path: &mut NodePath, key: Option<Location>, record: bool) -> Result<(), Stop> {
        let (event, marker) = self.next()?;
        let mut value = location(&marker);
        match event {
            Event::MappingStart(..) => {
                // A block mapping is pointed at by its first key.
                let (event, first) = self.peek()?;
                if event != Event::MappingEnd && !self.opens_flow(&marker) {
                    value = location(&first);
                }
                self.record(path, key, value, record);
                self.mapping(path, record)
            }
            Event::SequenceStart(..) => {
                let (event, first) = self.peek()?;
                if event != Event::SequenceEnd && !self.opens_flow(&marker) {
                    value = location(&first);
                }
                self.record(path, key, value, record);
                let mut index = 0usize;
                while self.peek()?.0 != Event::SequenceEnd {
                    path.push(index.to_string());
                    let walked = self.node(path, None, record);
                    path.pop();
                    walked?;
                    index += 1;
                }
                self.next().map(|_| ())
            }
            _ => {
                self.record(path, key, value, record);
                Ok(())
            }
        }
    }

    fn mapping(&mut self, path: &mut NodePath, record: bool) -> Result<(), Stop> {
        let mut seen: HashMap<String, Location> = HashMap::new();
        loop {
            let (event, marker) = self.peek()?;
            let name = match event {
                Event::MappingEnd => return self.next().map(|_| ()),
                Event::Scalar(ref text, ..) => {
                    self.next()?;
                    text.clone()
                }
                _ => {
                    // A complex key (a mapping or sequence used as a key): walk it without recording.
                    self.node(&mut Vec::new(), None, false)?;
                    "?".to_owned()
                }
            };
            let key = location(&marker);
            let first = seen.get(&name).copied();
            if let Some(first) = first {
                if record {
                    self.positions.duplicates.push(Diagnostic {
                        location: key,
                        message: duplicate_message(path, &name, first.line, key.line),
                    });
                }
            } else {
                seen.insert(name.clone(), key);
            }
            path.push(name);
            let walked = self.node(path, Some(key), record && first.is_none());
            path.pop();
            walked?;
        }
    }

    fn record(&mut self, path: &[String], key: Option<Location>, value: Location, record: bool) {
        if record {
            self.positions.spots.entry(path.to_vec()).or_insert(Spot { key, value });
        }
    }
}

fn duplicate_message(path: &[String], name: &str, first_line: usize, again_line: usize) -> String {
    let what = match path {
        [jobs] if jobs == "jobs" => format!("job `{name}`"),
        [gates] if gates == "gates" => format!("gate `{name}`"),
        _ => format!("key `{name}`"),
    };
    format!("{what} is defined twice, at line {first_line} and again at line {again_line}; keep one")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> NodePath {
        p.split('.').filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }

    fn at(line: usize, column: usize) -> Location {
        Location { line, column }
    }

    #[test]
    fn block_and_flow_nodes_have_key_and_value_positions() {
        let text = "jobs:\n  hello:\n    command: \"echo hi\"\n    params: { who: { default: x } }\n    on_success:\n      - a\n      - job: b\n";
        let p = Positions::index(text);
        assert_eq!(p.key(&path("jobs.hello")), at(2, 3));
        assert_eq!(p.value(&path("jobs.hello")), at(3, 5), "a block mapping points at its first key");
        assert_eq!(p.value(&path("jobs.hello.params")), at(4, 13), "a flow mapping points at its brace");
        assert_eq!(p.value(&path("jobs.hello.on_success")), at(6, 9), "a block sequence points at its first item");
        assert_eq!(p.key(&path("jobs.hello.command")), at(3, 5));
        assert_eq!(p.value(&path("jobs.hello.command")), at(3, 14));
        assert_eq!(p.key(&path("jobs.hello.params.who.default")), at(4, 22));
        assert_eq!(p.value(&path("jobs.hello.params.who.default")), at(4, 31));
        assert_eq!(p.value(&path("jobs.hello.on_success.0")), at(6, 9));
        assert_eq!(p.key(&path("jobs.hello.on_success.1.job")), at(7, 9));
        assert!(p.duplicates.is_empty());
    }

    #[test]
    fn unknown_paths_fall_back_to_the_nearest_ancestor() {
        let p = Positions::index("jobs:\n  hello:\n    command: x\n");
        assert_eq!(p.value(&path("jobs.hello.command.nothing.here")), at(3, 14));
        assert_eq!(p.key(&path("elsewhere")), at(1, 1));
    }

    #[test]
    fn duplicate_keys_name_both_lines_and_keep_the_first_positions() {
        let text = "jobs:\n  a:\n    command: x\n  a:\n    command: y\n";
        let p = Positions::index(text);
        assert_eq!(p.duplicates.len(), 1);
        assert_eq!(p.duplicates[0].location, at(4, 3));
        assert_eq!(p.duplicates[0].message, "job `a` is defined twice, at line 2 and again at line 4; keep one");
        assert_eq!(p.value(&path("jobs.a.command")), at(3, 14));
    }

    #[test]
    fn deep_nesting_stops_the_walk_instead_of_the_stack() {
        let text = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let p = Positions::index(&text);
        assert_eq!(p.key(&path("a")), at(1, 1));
    }

    #[test]
    fn a_syntax_error_keeps_what_came_before() {
        let p = Positions::index("jobs:\n  a:\n    command: x\n  b: [1, 2\n");
        assert_eq!(p.value(&path("jobs.a.command")), at(3, 14));
    }
}
