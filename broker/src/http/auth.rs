//! Bearer tokens on the front door (`tokens:` in the job file).
//!
//! When any token is configured, every endpoint but `GET /healthz` needs
//! `Authorization: Bearer TOKEN`: without one, or with one the file does not
//! know, the answer is 401 with `WWW-Authenticate: Bearer`; with a token
//! lacking the endpoint's scope it is 403 naming the scope. Each route
//! declares what it needs (`Need`); `job_start` also checks a limited
//! `start: [names]` against the job name once it has read it
//! (`Grant::may_start`).
//!
//! The job file holds only each token's SHA-256. A presented token is hashed
//! and compared with every entry in constant time (no early exit on the first
//! differing byte nor on the first match). The token itself is never logged,
//! echoed or kept; refusals are logged, rate-limited, with the entry's name.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use config::{Scopes, TokenDef};
use subtle::ConstantTimeEq;

use super::limits::{REFUSALS_LOGGED_PER_WINDOW, REFUSAL_LOG_WINDOW, TOKEN_BYTES_MAX};
use super::log_budget::LogBudget;
use super::reject::Reject;
use super::routes::Peer;

/// The tokens the front door takes; empty means none is asked for.
#[derive(Debug)]
pub struct Tokens {
    entries: Vec<TokenDef>,
    log: LogBudget,
}

impl Default for Tokens {
    fn default() -> Tokens {
        Tokens::new(Vec::new())
    }
}

impl Tokens {
    pub fn new(entries: Vec<TokenDef>) -> Tokens {
        Tokens { entries, log: LogBudget::new(REFUSALS_LOGGED_PER_WINDOW, REFUSAL_LOG_WINDOW) }
    }

    /// The tokens of a job file.
    pub fn from_file(file: &config::JobFile) -> Tokens {
        Tokens::new(file.tokens.values().cloned().collect())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry whose hash is the presented token's. Every entry is compared, in constant time.
    fn find(&self, presented: &str) -> Option<&TokenDef> {
        let hash = hash_token(presented);
        let mut found = None;
        for entry in &self.entries {
            let equal: bool = entry.sha256.ct_eq(&hash).into();
            // Hashes are unique (the job file refuses repeats), so at most one entry matches.
            if equal {
                found = Some(entry);
            }
        }
        found
    }
}

/// SHA-256 of a token's text, as `tokens:` entries hold it.
pub fn hash_token(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// `sha256:HEX`, the form of `hash:` in a `tokens:` entry.
pub fn hash_text(hash: &[u8; 32]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A new random token: `jobz_` and 64 hex digits (256 bits from the system's generator).
pub fn generate_token() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("jobz_{hex}"))
}

/// What a route needs of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Any `GET` but `/healthz`: the `read` scope.
    Read,
    /// `job_start`: a `start` scope; a limited one is checked against the name in the handler.
    Start,
    /// Cancel and retry: the `admin` scope.
    Admin,
    /// A job's progress report: a `start` scope (what a worker's jobs hold) or `admin`.
    Progress,
}

impl Need {
    fn scope(self) -> &'static str {
        match self {
            Need::Read => "read",
            Need::Start | Need::Progress => "start",
            Need::Admin => "admin",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Need::Read => "reading jobs, logs, workers, gates, schedules and metrics",
            Need::Start => "starting jobs",
            Need::Admin => "cancelling and retrying jobs",
            Need::Progress => "reporting a job's progress",
        }
    }

    fn granted(self, scopes: &Scopes) -> bool {
        match self {
            Need::Read => scopes.read,
            Need::Start => scopes.start.is_some(),
            Need::Admin => scopes.admin,
            Need::Progress => scopes.start.is_some() || scopes.admin,
        }
    }
}

/// What the request's token allows, for the handlers that look closer (`job_start`).
#[derive(Debug, Clone)]
pub(crate) enum Grant {
    /// No tokens are configured: everything.
    Open,
    Token {
        name: String,
        scopes: Scopes,
    },
}

impl Grant {
    /// A limited `start: [names]` allows only those names; a 403 otherwise (logged
    /// within `tokens`' budget).
    pub fn may_start(&self, job_name: &str, tokens: &Tokens) -> Result<(), Reject> {
        let Grant::Token { name, scopes } = self else { return Ok(()) };
        match &scopes.start {
            Some(start) if start.allows(job_name) => Ok(()),
            Some(config::StartScope::Only(names)) => {
                let allowed: Vec<&str> = names.iter().map(String::as_str).collect();
                if let Some(left_out) = tokens.log.admit() {
                    tracing::info!(token = %name, job_name, left_out, "refused: the token may not start this job");
                }
                Err(Reject::forbidden(
                    "start",
                    format!("token `{name}` may start only {}, not `{job_name}`", allowed.join(", ")),
                ))
            }
            _ => Err(Reject::forbidden("start", format!("token `{name}` lacks the `start` scope"))),
        }
    }
}

/// The middleware of a guarded route: authenticates the bearer token, checks `need`,
/// and hands the [`Grant`] to the handler.
pub(crate) async fn authorize(
    State((tokens, need)): State<(Arc<Tokens>, Need)>,
    mut request: Request,
    next: Next,
) -> Response {
    if tokens.is_empty() {
        request.extensions_mut().insert(Grant::Open);
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let peer = request.extensions().get::<Peer>().map(|p| p.0.to_string()).unwrap_or_default();
    let entry = match bearer(&request) {
        Err(reject) => {
            if let Some(left_out) = tokens.log.admit() {
                tracing::info!(%peer, %path, reason = %reject.body.error, left_out, "refused: no usable token");
            }
            return reject.into_response();
        }
        Ok(presented) => match tokens.find(presented) {
            Some(entry) => entry,
            None => {
                if let Some(left_out) = tokens.log.admit() {
                    tracing::info!(%peer, %path, left_out, "refused: unknown token");
                }
                return Reject::unauthorized("the token is not known to this front door").into_response();
            }
        },
    };
    if !need.granted(&entry.scopes) {
        if let Some(left_out) = tokens.log.admit() {
            let scope = need.scope();
            tracing::info!(%peer, %path, token = %entry.name, %scope, left_out, "refused: the token lacks a scope");
        }
        let message = format!("token `{}` lacks the `{}` scope needed for {}", entry.name, need.scope(), need.what());
        return Reject::forbidden(need.scope(), message).into_response();
    }
    request.extensions_mut().insert(Grant::Token { name: entry.name.clone(), scopes: entry.scopes.clone() });
    next.run(request).await
}

/// The token of `Authorization: Bearer TOKEN`; a 401 saying what is wrong otherwise.
fn bearer(request: &Request) -> Result<&str, Reject> {
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Reject::unauthorized(
            "this front door needs a token: send `Authorization: Bearer TOKEN` (jobz sends JOBZ_TOKEN or --token)",
        ));
    };
    if values.next().is_some() {
        return Err(Reject::unauthorized("the Authorization header is given more than once"));
    }
    let text = value.to_str().unwrap_or("");
    let token = match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => return Err(Reject::unauthorized("the Authorization header must be `Bearer TOKEN`")),
    };
    if token.is_empty() || token.len() > TOKEN_BYTES_MAX || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Reject::unauthorized(format!(
            "the bearer token must be 1 to {TOKEN_BYTES_MAX} bytes of visible ASCII"
        )));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn token(name: &str, secret: &str, scopes: Scopes) -> TokenDef {
        TokenDef { name: name.to_owned(), sha256: hash_token(secret), scopes }
    }

    #[test]
    fn a_token_is_found_by_its_hash_only() {
        let read = Scopes { read: true, ..Scopes::default() };
        let tokens = Tokens::new(vec![token("a", "secret-a", read.clone()), token("b", "secret-b", read)]);
        assert_eq!(tokens.find("secret-b").map(|t| t.name.as_str()), Some("b"));
        assert!(tokens.find("secret-c").is_none());
        assert!(tokens.find("").is_none());
    }

    #[test]
    fn hashes_read_back_as_the_job_file_writes_them() {
        // The SHA-256 of "test", as `sha256sum` prints it.
        let hash = hash_token("test");
        assert_eq!(hash_text(&hash), "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        let generated = generate_token().unwrap();
        assert!(generated.starts_with("jobz_") && generated.len() == 69, "{generated}");
        assert_ne!(generated, generate_token().unwrap());
    }

    #[test]
    fn needs_map_to_scopes() {
        let start_only = Scopes { start: Some(config::StartScope::Any), ..Scopes::default() };
        assert!(Need::Start.granted(&start_only) && Need::Progress.granted(&start_only));
        assert!(!Need::Read.granted(&start_only) && !Need::Admin.granted(&start_only));
        let admin = Scopes { admin: true, ..Scopes::default() };
        assert!(Need::Progress.granted(&admin) && !Need::Start.granted(&admin));
    }

    #[test]
    fn a_limited_start_names_what_it_allows() {
        let only = config::StartScope::Only(["a".to_owned(), "b".to_owned()].into());
        let grant = Grant::Token { name: "cron".into(), scopes: Scopes { start: Some(only), ..Scopes::default() } };
        let tokens = Tokens::default();
        assert!(grant.may_start("a", &tokens).is_ok());
        let reject = grant.may_start("c", &tokens).unwrap_err();
        assert_eq!(reject.status, StatusCode::FORBIDDEN);
        assert_eq!(reject.body.error, "token `cron` may start only a, b, not `c`");
        assert_eq!(reject.body.scope.as_deref(), Some("start"));
        assert!(Grant::Open.may_start("anything", &tokens).is_ok());
    }
}
