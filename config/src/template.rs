//! Templates with `{name}` placeholders, and commands built from them safely.
//!
//! SPEC "Running a command safely": a command is split into argv words with
//! shell-words rules *before* any placeholder is filled, and each placeholder
//! fills inside its word, so a value can never add, remove or split words. In
//! shell mode (`shell: true`) the script is lexed once at load time so that each
//! placeholder knows its quoting context, and every value is quoted for that
//! context, so `/bin/sh` always sees it as literal text.
//!
//! Why the context matters: one quoting cannot serve every position. A value
//! wrapped in `'...'` is literal where the script is unquoted, but inside
//! `"..."` the single quotes are plain characters, so `"{v}"` filled with
//! `'$(touch pwned)'` would run `touch`. Inside `'...'` only `'` ends the
//! string, inside `"..."` only `\`, `$`, `` ` `` and `"` are special. So the
//! lexer follows quotes, `$(...)` (a fresh unquoted script, even inside
//! `"..."`) and `#` comments (a `'` in a comment quotes nothing). Where our
//! quoting would not give a literal, or where the lexer could lose track of
//! what `sh` sees (after a here-document, inside backquotes, `${...}`,
//! `$((...))`, bash's `$'...'`, right after a `\` or a `$`), a placeholder is
//! refused at load time with [`TemplateError::Unsafe`]; the value is also in
//! the process environment, which is always safe to use from a script.
//!
//! Filling never fails on a value's content: a value holding NUL fills fine,
//! and spawning the process then fails (an argv cannot hold NUL). Param
//! validation rejects control characters long before that.
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
    #[error("placeholder {{{name}}} at byte {offset} cannot be quoted safely: it {reason} (use the param's environment variable there instead)")]
    Unsafe { name: String, offset: usize, reason: &'static str },
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
        let parts = parse_parts(source)?.into_iter().map(|(_, part)| part).collect();
        Ok(Template { source: source.to_string(), parts })
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
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(name) => out.push_str(lookup(values, name)?),
            }
        }
        Ok(out)
    }
}

impl CommandTemplate {
    /// Splits `source` into words with shell-words rules, then parses placeholders inside each word.
    pub fn parse_argv(source: &str) -> Result<CommandTemplate, TemplateError> {
        // Splitting first is the whole point: quotes and spaces in the template decide the
        // words, and nothing a value holds can change them afterwards.
        let split = shell_words::split(source).map_err(|e| TemplateError::Split { reason: e.to_string() })?;
        if split.is_empty() {
            return Err(TemplateError::EmptyCommand);
        }
        let mut words = Vec::with_capacity(split.len());
        for (index, word) in split.iter().enumerate() {
            // Offsets inside a word mean little to a reader, so they are moved back onto the source.
            let template = Template::parse(word).map_err(|e| relocate(e, source, index))?;
            words.push(template);
        }
        Ok(CommandTemplate::Argv { source: source.to_string(), words })
    }

    /// Lexes a `/bin/sh` script, recording each placeholder's quoting context. A placeholder
    /// in a `#` comment stays as written and is not filled; one whose context cannot be quoted
    /// safely is refused with [`TemplateError::Unsafe`].
    pub fn parse_shell(source: &str) -> Result<CommandTemplate, TemplateError> {
        let mut lexer = ShellLexer::new();
        let mut parts: Vec<ShellPart> = Vec::new();
        for (offset, part) in parse_parts(source)? {
            let piece = match part {
                Part::Literal(text) => {
                    lexer.feed(&text);
                    ShellPart::Literal(text)
                }
                Part::Placeholder(name) => match lexer.placeholder() {
                    Ok(Some(context)) => ShellPart::Placeholder { name, context },
                    // Inside a comment the value would be ignored, unless it held a newline,
                    // which would end the comment: the text stays as written instead.
                    Ok(None) => ShellPart::Literal(format!("{{{name}}}")),
                    Err(reason) => return Err(TemplateError::Unsafe { name, offset, reason }),
                },
            };
            match (parts.last_mut(), piece) {
                (Some(ShellPart::Literal(last)), ShellPart::Literal(text)) => last.push_str(&text),
                (_, piece) => parts.push(piece),
            }
        }
        lexer.finish()?;
        if parts.iter().all(|p| matches!(p, ShellPart::Literal(t) if t.trim().is_empty())) {
            return Err(TemplateError::EmptyCommand);
        }
        Ok(CommandTemplate::Shell { source: source.to_string(), parts })
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
        match self {
            CommandTemplate::Argv { words, .. } => words.iter().flat_map(Template::placeholders).collect(),
            CommandTemplate::Shell { parts, .. } => parts
                .iter()
                .filter_map(|p| match p {
                    ShellPart::Placeholder { name, .. } => Some(name.as_str()),
                    ShellPart::Literal(_) => None,
                })
                .collect(),
        }
    }

    /// The argv to execute: the filled words, or `["/bin/sh", "-c", script]` in shell mode.
    pub fn fill(&self, values: &Values) -> Result<Vec<String>, FillError> {
        match self {
            CommandTemplate::Argv { words, .. } => words.iter().map(|w| w.fill(values)).collect(),
            CommandTemplate::Shell { parts, .. } => {
                let mut script = String::new();
                for part in parts {
                    match part {
                        ShellPart::Literal(text) => script.push_str(text),
                        ShellPart::Placeholder { name, context } => {
                            script.push_str(&context.quote(lookup(values, name)?))
                        }
                    }
                }
                Ok(vec!["/bin/sh".to_string(), "-c".to_string(), script])
            }
        }
    }
}

impl QuoteContext {
    /// Quotes `value` so that, written at a place of this context, `sh` reads it as literal text.
    pub fn quote(self, value: &str) -> String {
        match self {
            // shell-words quoting, but always applied: an empty value stays one (empty) word.
            QuoteContext::Unquoted => format!("'{}'", value.replace('\'', r"'\''")),
            // Close the string, add an escaped quote, reopen: nothing else is special in '...'.
            QuoteContext::SingleQuoted => value.replace('\'', r"'\''"),
            // The only characters special inside "..." (`!` is not, in a non-interactive sh).
            QuoteContext::DoubleQuoted => {
                let mut out = String::with_capacity(value.len());
                for c in value.chars() {
                    if matches!(c, '\\' | '$' | '`' | '"') {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out
            }
        }
    }
}

fn lookup<'v>(values: &'v Values, name: &str) -> Result<&'v str, FillError> {
    values.get(name).map(String::as_str).ok_or_else(|| FillError { name: name.to_string() })
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Parses a template into parts, each with the byte offset where it starts in `source`.
fn parse_parts(source: &str) -> Result<Vec<(usize, Part)>, TemplateError> {
    let bytes = source.as_bytes();
    let mut parts = Vec::new();
    let mut literal = String::new();
    let (mut literal_start, mut plain_start, mut i) = (0, 0, 0);
    while i < bytes.len() {
        let doubled = bytes.get(i + 1) == Some(&bytes[i]);
        match bytes[i] {
            b'{' | b'}' if doubled => {
                literal.push_str(&source[plain_start..=i]);
                i += 2;
                plain_start = i;
            }
            b'}' => return Err(TemplateError::StrayClose { offset: i }),
            b'{' => {
                let close = source[i..].find('}').map(|n| i + n).ok_or(TemplateError::Unclosed { offset: i })?;
                let name = &source[i + 1..close];
                if !is_name(name) {
                    return Err(TemplateError::BadName { name: name.to_string(), offset: i });
                }
                literal.push_str(&source[plain_start..i]);
                if !literal.is_empty() {
                    parts.push((literal_start, Part::Literal(std::mem::take(&mut literal))));
                }
                parts.push((i, Part::Placeholder(name.to_string())));
                i = close + 1;
                (plain_start, literal_start) = (i, i);
            }
            _ => i += 1,
        }
    }
    literal.push_str(&source[plain_start..]);
    if !literal.is_empty() {
        parts.push((literal_start, Part::Literal(literal)));
    }
    Ok(parts)
}

/// Moves the offset of an error found in word `index` of `source` onto `source` itself.
fn relocate(error: TemplateError, source: &str, index: usize) -> TemplateError {
    let at = |offset: usize| {
        split_offsets(source).and_then(|words| words.get(index)?.get(offset).copied()).unwrap_or(offset)
    };
    match error {
        TemplateError::Unclosed { offset } => TemplateError::Unclosed { offset: at(offset) },
        TemplateError::StrayClose { offset } => TemplateError::StrayClose { offset: at(offset) },
        TemplateError::BadName { name, offset } => TemplateError::BadName { name, offset: at(offset) },
        other => other,
    }
}

/// Mirrors `shell_words::split` (1.x), but yields for each word the source offset of each of its
/// bytes. Only used to place error offsets; the words themselves come from `shell_words`.
fn split_offsets(source: &str) -> Option<Vec<Vec<usize>>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Delimiter,
        Backslash,
        Unquoted,
        UnquotedBackslash,
        Single,
        Double,
        DoubleBackslash,
        Comment,
    }
    use State::*;
    let (mut words, mut word, mut state) = (Vec::new(), Vec::new(), Delimiter);
    // Every byte of `c` at `at`, so that word byte offsets map one to one.
    let push = |word: &mut Vec<usize>, at: usize, c: char| word.extend(at..at + c.len_utf8());
    let mut chars = source.char_indices();
    loop {
        let next = chars.next();
        state = match (state, next) {
            (Delimiter | Comment, None) => break,
            (Single | Double | DoubleBackslash, None) => return None,
            (Backslash | UnquotedBackslash | Unquoted, None) => {
                if state != Unquoted {
                    word.push(source.len() - 1);
                }
                words.push(word);
                break;
            }
            (Comment, Some((_, '\n'))) => Delimiter,
            (Comment, Some(_)) => Comment,
            (Delimiter | Unquoted, Some((_, '\''))) => Single,
            (Delimiter | Unquoted, Some((_, '"'))) => Double,
            (Delimiter, Some((_, '\\'))) => Backslash,
            (Unquoted, Some((_, '\\'))) => UnquotedBackslash,
            (Delimiter, Some((_, ' ' | '\t' | '\n'))) => Delimiter,
            (Delimiter, Some((_, '#'))) => Comment,
            (Unquoted, Some((_, ' ' | '\t' | '\n'))) => {
                words.push(std::mem::take(&mut word));
                Delimiter
            }
            (Backslash, Some((_, '\n'))) => Delimiter,
            (UnquotedBackslash, Some((_, '\n'))) => Unquoted,
            (Delimiter | Unquoted | Backslash | UnquotedBackslash, Some((at, c))) => {
                push(&mut word, at, c);
                Unquoted
            }
            (Single, Some((_, '\''))) | (Double, Some((_, '"'))) => Unquoted,
            (Double, Some((_, '\\'))) => DoubleBackslash,
            (Single, Some((at, c))) => {
                push(&mut word, at, c);
                Single
            }
            (Double, Some((at, c))) => {
                push(&mut word, at, c);
                Double
            }
            (DoubleBackslash, Some((_, '\n'))) => Double,
            (DoubleBackslash, Some((at, c))) => {
                if !matches!(c, '$' | '`' | '"' | '\\') {
                    word.push(at - 1);
                }
                push(&mut word, at, c);
                Double
            }
        };
    }
    Some(words)
}

/// Where the shell lexer is: each frame is a construct that a closing character ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// Unquoted script text: the top level, or the inside of `$(...)` (`subst`), which `sh`
    /// parses as a fresh script even within `"..."`. `parens` counts open `(` inside it.
    Script {
        subst: bool,
        parens: u32,
    },
    Single,
    Double,
    /// A `#` comment, up to the end of the line.
    Comment,
    /// `` `...` ``: ends at the next unescaped backquote, whatever the quotes inside.
    Backtick,
    /// `${...}`, followed only while it holds plain characters.
    Brace,
    /// `$((...))`; `parens` counts open `(` inside it.
    Arith {
        parens: u32,
    },
}

/// The previous character, where it changes the meaning of the next one. Kept as state rather
/// than read by looking ahead, because a line continuation (`\` newline, which `sh` removes
/// before anything else) may sit between the two.
#[derive(Debug, Clone, Copy, PartialEq)]
enum After {
    Nothing,
    Dollar,
    SubstOpen,
    Paren,
    Less,
    ArithParen,
}

/// A small POSIX `sh` lexer that tracks just enough to know a placeholder's quoting context.
/// It is conservative: on anything it cannot follow for certain it stops (`taint`) and every
/// later placeholder is refused, rather than guessing a context `sh` might not share.
struct ShellLexer {
    frames: Vec<Frame>,
    after: After,
    /// A backslash waits for the character it escapes; holds the state from before it, which a
    /// line continuation restores.
    escape: Option<(bool, After)>,
    /// The next character starts a token (a `#` there starts a comment).
    token_start: bool,
    /// The start of the current unquoted word, to spot the keyword `case`.
    word: String,
    taint: Option<&'static str>,
}

const ARITH_TAINT: &str = "comes after a `$((...))` the lexer cannot follow";

impl ShellLexer {
    fn new() -> ShellLexer {
        ShellLexer {
            frames: vec![Frame::Script { subst: false, parens: 0 }],
            after: After::Nothing,
            escape: None,
            token_start: true,
            word: String::new(),
            taint: None,
        }
    }

    fn top(&self) -> Frame {
        self.frames.last().copied().unwrap_or(Frame::Script { subst: false, parens: 0 })
    }

    fn set_top(&mut self, frame: Frame) {
        if let Some(top) = self.frames.last_mut() {
            *top = frame;
        }
    }

    /// Pops a frame; the construct it closed is part of a word, so no token starts here.
    fn pop(&mut self) {
        if self.frames.len() > 1 {
            self.frames.pop();
        }
        self.token_start = false;
    }

    /// Only `case` matters, so the word is kept to five characters; `\` marks a quoted one.
    fn word_push(&mut self, c: char) {
        if self.word.len() < 5 {
            self.word.push(c);
        }
    }

    fn feed(&mut self, text: &str) {
        for c in text.chars() {
            if self.taint.is_some() {
                return;
            }
            let after = std::mem::replace(&mut self.after, After::Nothing);
            if let Some((token_start, after)) = self.escape.take() {
                if c == '\n' {
                    (self.token_start, self.after) = (token_start, after);
                } else {
                    self.token_start = false;
                    self.word_push('\\');
                }
                continue;
            }
            let top = self.top();
            let expanding = matches!(top, Frame::Script { .. } | Frame::Double | Frame::Arith { .. });
            match (after, c) {
                (After::Dollar, '(') if expanding => {
                    self.frames.push(Frame::Script { subst: true, parens: 0 });
                    (self.after, self.token_start) = (After::SubstOpen, true);
                    continue;
                }
                (After::Dollar, '{') if expanding => {
                    self.frames.push(Frame::Brace);
                    continue;
                }
                (After::Dollar, '[') if expanding => {
                    self.taint = Some("comes after a bash `$[...]` arithmetic expansion");
                    return;
                }
                (After::Dollar, '\'') if matches!(top, Frame::Script { .. }) => {
                    self.taint = Some("comes after a bash `$'...'` string, which the lexer cannot follow");
                    return;
                }
                (After::SubstOpen, '(') => {
                    self.set_top(Frame::Arith { parens: 0 });
                    continue;
                }
                _ => {}
            }
            match top {
                Frame::Comment if c == '\n' => {
                    self.frames.pop();
                    self.token_start = true;
                }
                Frame::Single if c == '\'' => self.pop(),
                Frame::Comment | Frame::Single => {}
                Frame::Backtick => match c {
                    '\\' => self.escape = Some((false, After::Nothing)),
                    '`' => self.pop(),
                    _ => {}
                },
                Frame::Double => match c {
                    '"' => self.pop(),
                    '\\' => self.escape = Some((false, after)),
                    '`' => self.frames.push(Frame::Backtick),
                    '$' => self.after = After::Dollar,
                    _ => {}
                },
                Frame::Brace => match c {
                    '}' => self.pop(),
                    '\'' | '"' | '\\' | '`' | '$' | '{' => {
                        self.taint = Some("comes after a `${...}` holding quotes or expansions")
                    }
                    _ => {}
                },
                Frame::Arith { parens } => match c {
                    '(' => self.set_top(Frame::Arith { parens: parens + 1 }),
                    ')' if parens > 0 => self.set_top(Frame::Arith { parens: parens - 1 }),
                    ')' if after == After::ArithParen => self.pop(),
                    ')' => self.after = After::ArithParen,
                    '\'' | '"' | '\\' | '`' => self.taint = Some(ARITH_TAINT),
                    _ if after == After::ArithParen => self.taint = Some(ARITH_TAINT),
                    '$' => self.after = After::Dollar,
                    _ => {}
                },
                Frame::Script { subst, parens } => {
                    let token_start = std::mem::replace(&mut self.token_start, false);
                    if token_start {
                        self.word.clear();
                    }
                    match c {
                        '#' if token_start => self.frames.push(Frame::Comment),
                        ' ' | '\t' | '\n' | ';' | '&' | '|' | '>' => {
                            if subst && self.word == "case" {
                                // A `case` pattern's `)` would look like the end of the `$(...)`.
                                self.taint = Some("comes after a `case` inside `$(...)`");
                            }
                            self.token_start = true;
                        }
                        '<' if after == After::Less => {
                            self.taint = Some("comes after a here-document (`<<`), whose body the lexer cannot follow")
                        }
                        '(' if after == After::Paren => {
                            // bash reads `((...))` as arithmetic, where single quotes do not quote.
                            self.taint = Some("comes after `((`, which bash reads as arithmetic")
                        }
                        '<' | '(' => {
                            if c == '(' {
                                self.set_top(Frame::Script { subst, parens: parens + 1 });
                            }
                            self.after = if c == '<' { After::Less } else { After::Paren };
                            self.token_start = true;
                        }
                        ')' if subst && parens == 0 => self.pop(),
                        ')' => {
                            self.set_top(Frame::Script { subst, parens: parens.saturating_sub(1) });
                            self.token_start = true;
                        }
                        '\\' => self.escape = Some((token_start, after)),
                        '\'' | '"' | '`' | '$' => {
                            self.word_push('\\');
                            match c {
                                '\'' => self.frames.push(Frame::Single),
                                '"' => self.frames.push(Frame::Double),
                                '`' => self.frames.push(Frame::Backtick),
                                _ => self.after = After::Dollar,
                            }
                        }
                        _ => self.word_push(c),
                    }
                }
            }
        }
    }

    /// The context of a placeholder at the current position; `Ok(None)` inside a comment.
    fn placeholder(&mut self) -> Result<Option<QuoteContext>, &'static str> {
        if let Some(reason) = self.taint {
            return Err(reason);
        }
        if self.escape.is_some() {
            // `\'...'` would escape our opening quote, `"\` + `\$` would unescape the `$`.
            return Err("follows a backslash");
        }
        if std::mem::replace(&mut self.after, After::Nothing) == After::Dollar {
            // `$'...'` is a bash escape string, and `"$` + `(...)` a command substitution.
            return Err("follows a `$` (write `${{name}}` for a shell variable)");
        }
        let context = match self.top() {
            Frame::Script { .. } => QuoteContext::Unquoted,
            Frame::Single => QuoteContext::SingleQuoted,
            Frame::Double => QuoteContext::DoubleQuoted,
            Frame::Comment => return Ok(None),
            Frame::Backtick => return Err("is inside backquotes (use `$(...)`)"),
            Frame::Brace => return Err("is inside `${...}`"),
            Frame::Arith { .. } => return Err("is inside an arithmetic expansion"),
        };
        self.token_start = false;
        self.word_push('\\');
        Ok(Some(context))
    }

    /// Checks that every quote and substitution is closed at the end of the script.
    fn finish(&self) -> Result<(), TemplateError> {
        if self.taint.is_some() {
            // The lexer stopped following the script; `sh` reports its own syntax errors.
            return Ok(());
        }
        let open = self.frames.iter().rev().find(|f| **f != Frame::Comment);
        let reason = match open {
            None | Some(Frame::Script { subst: false, .. }) => return Ok(()),
            Some(Frame::Comment) | Some(Frame::Script { subst: true, .. }) => "a `$(` is never closed",
            Some(Frame::Single) => "a single quote is never closed",
            Some(Frame::Double) => "a double quote is never closed",
            Some(Frame::Backtick) => "a backquote is never closed",
            Some(Frame::Brace) => "a `${` is never closed",
            Some(Frame::Arith { .. }) => "a `$((` is never closed",
        };
        Err(TemplateError::Split { reason: reason.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lit(s: &str) -> Part {
        Part::Literal(s.to_string())
    }

    fn ph(s: &str) -> Part {
        Part::Placeholder(s.to_string())
    }

    fn values(pairs: &[(&str, &str)]) -> Values {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The contexts of a shell script's placeholders, in order.
    fn contexts(script: &str) -> Vec<(String, QuoteContext)> {
        match CommandTemplate::parse_shell(script) {
            Ok(CommandTemplate::Shell { parts, .. }) => parts
                .into_iter()
                .filter_map(|p| match p {
                    ShellPart::Placeholder { name, context } => Some((name, context)),
                    ShellPart::Literal(_) => None,
                })
                .collect(),
            other => panic!("{script:?} gave {other:?}"),
        }
    }

    fn unsafe_reason(script: &str) -> &'static str {
        match CommandTemplate::parse_shell(script) {
            Err(TemplateError::Unsafe { reason, .. }) => reason,
            other => panic!("{script:?} gave {other:?}, not Unsafe"),
        }
    }

    #[test]
    fn parses_placeholders_and_brace_escapes() {
        let t = Template::parse("a{b}c{{d}}{e}{{{f}}}").unwrap();
        assert_eq!(t.parts(), &[lit("a"), ph("b"), lit("c{d}"), ph("e"), lit("{"), ph("f"), lit("}")]);
        assert_eq!(t.placeholders().collect::<Vec<_>>(), ["b", "e", "f"]);
        assert_eq!(Template::parse("").unwrap().parts(), &[]);
        assert_eq!(Template::parse("{_x9}").unwrap().parts(), &[ph("_x9")]);
    }

    #[test]
    fn template_errors_carry_byte_offsets() {
        let err = |s: &str| Template::parse(s).unwrap_err();
        assert_eq!(err("ab{cd"), TemplateError::Unclosed { offset: 2 });
        assert_eq!(err("é{"), TemplateError::Unclosed { offset: 2 });
        assert_eq!(err("a}b"), TemplateError::StrayClose { offset: 1 });
        assert_eq!(err("{a}}"), TemplateError::StrayClose { offset: 3 });
        assert_eq!(err("x{a b}"), TemplateError::BadName { name: "a b".into(), offset: 1 });
        assert_eq!(err("{}"), TemplateError::BadName { name: "".into(), offset: 0 });
        assert_eq!(err("{1x}"), TemplateError::BadName { name: "1x".into(), offset: 0 });
        assert_eq!(err("{a-b}"), TemplateError::BadName { name: "a-b".into(), offset: 0 });
    }

    #[test]
    fn fill_inserts_values_verbatim_and_names_missing_ones() {
        let t = Template::parse("{a}-{{{b}}}").unwrap();
        assert_eq!(t.fill(&values(&[("a", "$(x) {c}"), ("b", "")])).unwrap(), "$(x) {c}-{}");
        assert_eq!(t.fill(&values(&[("a", "1")])), Err(FillError { name: "b".into() }));
    }

    #[test]
    fn argv_splits_before_parsing_placeholders() {
        let c = CommandTemplate::parse_argv(r#"echo "hello {who}" x\ {n}y '{{' {who}"#).unwrap();
        assert_eq!(c.placeholders(), ["who", "n", "who"]);
        let argv = c.fill(&values(&[("who", "a b; c"), ("n", "")])).unwrap();
        assert_eq!(argv, ["echo", "hello a b; c", "x y", "{", "a b; c"]);
        let empty = CommandTemplate::parse_argv("run {v}").unwrap().fill(&values(&[("v", "")])).unwrap();
        assert_eq!(empty, ["run", ""]);
    }

    #[test]
    fn argv_errors() {
        let err = |s: &str| CommandTemplate::parse_argv(s).unwrap_err();
        assert_eq!(err(""), TemplateError::EmptyCommand);
        assert_eq!(err("  \n"), TemplateError::EmptyCommand);
        assert_eq!(err("# just a comment"), TemplateError::EmptyCommand);
        assert!(matches!(err("echo 'a"), TemplateError::Split { .. }));
        assert!(matches!(err("echo \"a"), TemplateError::Split { .. }));
        // Offsets point into the command as written, not into the split word.
        assert_eq!(err(r#"echo "a {b c}""#), TemplateError::BadName { name: "b c".into(), offset: 8 });
        assert_eq!(err(r#"echo x 'é' "a"\{b"#), TemplateError::Unclosed { offset: 16 });
        assert_eq!(err("echo a}"), TemplateError::StrayClose { offset: 6 });
    }

    proptest! {
        #[test]
        fn split_offsets_matches_shell_words(source in r#"[a \t\n'"\\#{}é]{0,24}"#) {
            match shell_words::split(&source) {
                Err(_) => prop_assert_eq!(split_offsets(&source), None),
                Ok(words) => {
                    let offsets = split_offsets(&source).unwrap();
                    let rebuilt: Vec<Vec<u8>> =
                        offsets.iter().map(|w| w.iter().map(|&o| source.as_bytes()[o]).collect()).collect();
                    let expected: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
                    prop_assert_eq!(rebuilt, expected);
                }
            }
        }
    }

    #[test]
    fn shell_records_quote_contexts() {
        use QuoteContext::*;
        let got = contexts(r#"printf %s {a} '{b}' "{c}" x{d}y "$(echo {e} "{f}")" 'it''s {g}' # {h} '"#);
        let want = [("a", Unquoted), ("b", SingleQuoted), ("c", DoubleQuoted), ("d", Unquoted)];
        let want = want.into_iter().chain([("e", Unquoted), ("f", DoubleQuoted), ("g", SingleQuoted)]);
        assert_eq!(got, want.map(|(n, c)| (n.to_string(), c)).collect::<Vec<_>>());
        assert_eq!(contexts(r#"echo "it's {a}""#), [("a".into(), DoubleQuoted)]);
        assert_eq!(contexts(r#"echo '"' {a}"#), [("a".into(), Unquoted)]);
        assert_eq!(contexts("echo ${{HOME}}/{a} $(( 1 + $(echo 2) )) {b}").len(), 2);
        assert_eq!(contexts("echo $( (echo a) ) {a}"), [("a".into(), Unquoted)]);
        // `\` newline is removed before anything else, so `$` and `(` still meet.
        assert_eq!(contexts("echo \"$\\\n(echo {a})\""), [("a".into(), Unquoted)]);
        assert_eq!(contexts("echo \\\n{a}"), [("a".into(), Unquoted)]);
    }

    #[test]
    fn shell_comments_hide_quotes_and_placeholders() {
        use QuoteContext::*;
        assert_eq!(contexts("# don't\necho {a}"), [("a".into(), Unquoted)]);
        assert_eq!(contexts("echo a;# it's\necho {a}"), [("a".into(), Unquoted)]);
        // A continuation joins the lines, so `#` starts a token, hence a comment.
        assert_eq!(contexts("echo a \\\n# it's\necho {a}"), [("a".into(), Unquoted)]);
        // Inside a word `#` is no comment and `'` quotes.
        assert_eq!(contexts("echo a#'{a}'"), [("a".into(), SingleQuoted)]);
        let c = CommandTemplate::parse_shell("echo {a} # for {b}").unwrap();
        assert_eq!(c.placeholders(), ["a"]);
        let argv = c.fill(&values(&[("a", "x")])).unwrap();
        assert_eq!(argv, ["/bin/sh", "-c", "echo 'x' # for {b}"]);
    }

    #[test]
    fn shell_refuses_placeholders_it_cannot_quote() {
        assert_eq!(unsafe_reason(r"echo \{a}"), "follows a backslash");
        assert_eq!(unsafe_reason(r#"echo "\{a}""#), "follows a backslash");
        assert!(unsafe_reason("echo ${a}").contains('$'));
        assert!(unsafe_reason(r#"echo "${a}""#).contains('$'));
        assert!(unsafe_reason("echo $'{a}'").contains("$'"));
        assert!(unsafe_reason("echo `echo {a}`").contains("backquotes"));
        assert!(unsafe_reason(r#"echo "`echo {a}`""#).contains("backquotes"));
        assert!(unsafe_reason("echo ${{X:-{a}}}").contains("${"));
        assert!(unsafe_reason(r#"echo ${{X:-"y"}} {a}"#).contains("${"));
        assert!(unsafe_reason("echo $(( {a} + 1 ))").contains("arithmetic"));
        assert!(unsafe_reason("cat <<EOF\n{a}\nEOF").contains("here-document"));
        assert!(unsafe_reason("cat <<EOF\nit's\nEOF\necho {a}").contains("here-document"));
        assert!(unsafe_reason("(( 1 )); echo {a}").contains("(("));
        assert!(unsafe_reason("echo \"$(case x in y) echo {a};; esac)\"").contains("case"));
        assert!(unsafe_reason("echo $[1] {a}").contains("$["));
        let err = CommandTemplate::parse_shell("echo ok; echo ${a}").unwrap_err();
        assert!(matches!(err, TemplateError::Unsafe { ref name, offset: 15, .. } if name == "a"), "{err:?}");
    }

    #[test]
    fn shell_errors() {
        let err = |s: &str| CommandTemplate::parse_shell(s).unwrap_err();
        for open in ["echo 'a", "echo \"a", "echo $(a", "echo `a", "echo ${{a", "echo $((1", "echo $(a # )"] {
            assert!(matches!(err(open), TemplateError::Split { .. }), "{open:?}");
        }
        assert_eq!(err(" \n "), TemplateError::EmptyCommand);
        assert_eq!(err("echo {a b}"), TemplateError::BadName { name: "a b".into(), offset: 5 });
        assert!(CommandTemplate::parse_shell("echo a # it's").is_ok());
    }

    #[test]
    fn quoting_per_context() {
        assert_eq!(QuoteContext::Unquoted.quote(""), "''");
        assert_eq!(QuoteContext::Unquoted.quote("it's"), r"'it'\''s'");
        assert_eq!(QuoteContext::SingleQuoted.quote("it's"), r"it'\''s");
        assert_eq!(QuoteContext::DoubleQuoted.quote(r#"a"$`\!'"#), r#"a\"\$\`\\!'"#);
        let c = CommandTemplate::parse_shell(r#"p {v} '{v}' "{v}""#).unwrap();
        let argv = c.fill(&values(&[("v", "'$x'")])).unwrap();
        assert_eq!(argv[2], r#"p ''\''$x'\''' ''\''$x'\''' "'\$x'""#);
    }
}
