//! Templates with `{name}` placeholders, and commands built from them safely.
//!
//! SPEC "Running a command safely": a command is split into argv words with
//! shell-words rules *before* any placeholder is filled, and each placeholder
//! fills inside its word, so a value can never add, remove or split words. In
//! shell mode (`shell: true`) the script is lexed once at load time so that each
//! placeholder knows its quoting context, and every value is quoted for that
//! context, so `/bin/sh` always sees it as literal text.
//!
//! `{{` and `}}` stand for literal braces. A placeholder name is
//! `[A-Za-z_][A-Za-z0-9_]*`.

use std::collections::BTreeMap;

/// Values for placeholders: the job's params plus the built-ins
/// (`job_id`, `job_name`, `run_id`, `attempt`, and `exit_code` in follow-ups).
pub type Values = BTreeMap<String, String>;

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    Placeholder(String),
}

/// A plain template: filled into a single string (env values, follow-up params, unique keys, gate keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// The quoting context a placeholder sits in inside a shell-mode script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteContext {
    Unquoted,
    SingleQuoted,
    DoubleQuoted,
}

/// A piece of a shell-mode script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellPart {
    Literal(String),
    Placeholder { name: String, context: QuoteContext },
}

/// A command: argv words (run directly) or a shell script (run with `/bin/sh -c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandTemplate {
    Argv { source: String, words: Vec<Template> },
    Shell { source: String, parts: Vec<ShellPart> },
}

/// Why a template could not be parsed. `offset` is a byte offset into the template text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed placeholder starting at byte {offset} (write `{{{{` for a literal brace)")]
    Unclosed { offset: usize },
    #[error("single `}}` at byte {offset} (write `}}}}` for a literal brace)")]
    StrayClose { offset: usize },
    #[error("bad placeholder name {name:?} at byte {offset}: use letters, digits and `_`, not starting with a digit")]
    BadName { name: String, offset: usize },
    #[error("the command is empty")]
    EmptyCommand,
    #[error("the command cannot be split into words: {reason}")]
    Split { reason: String },
}

/// A placeholder that had no value when filling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no value for placeholder {{{name}}}")]
pub struct FillError {
    pub name: String,
}

impl Template {
    /// Parses `{name}` placeholders and `{{`/`}}` escapes.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let _ = source;
        todo!()
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The names of the placeholders, in order of appearance (repeats included).
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(n) => Some(n.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Fills every placeholder with its value, verbatim.
    pub fn fill(&self, values: &Values) -> Result<String, FillError> {
        let _ = values;
        todo!()
    }
}

impl CommandTemplate {
    /// Splits `source` into words with shell-words rules, then parses placeholders inside each word.
    pub fn parse_argv(source: &str) -> Result<CommandTemplate, TemplateError> {
        let _ = source;
        todo!()
    }

    /// Lexes a `/bin/sh` script, recording each placeholder's quoting context.
    pub fn parse_shell(source: &str) -> Result<CommandTemplate, TemplateError> {
        let _ = source;
        todo!()
    }

    pub fn source(&self) -> &str {
        match self {
            CommandTemplate::Argv { source, .. } | CommandTemplate::Shell { source, .. } => source,
        }
    }

    pub fn is_shell(&self) -> bool {
        matches!(self, CommandTemplate::Shell { .. })
    }

    /// The names of all placeholders in the command.
    pub fn placeholders(&self) -> Vec<&str> {
        todo!()
    }

    /// The argv to execute: the filled words, or `["/bin/sh", "-c", script]` in shell mode.
    pub fn fill(&self, values: &Values) -> Result<Vec<String>, FillError> {
        let _ = values;
        todo!()
    }
}
