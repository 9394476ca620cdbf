//! [`JsonErrors`]: hyper's own answers to requests it cannot parse, sent as
//! the front door's JSON errors instead.
//!
//! hyper answers a request it cannot parse before any handler sees it, with
//! an empty body, and closes the connection: `400` for a malformed request,
//! `431` for a head over [`super::HttpOptions::header_bytes_max`] or with more
//! than [`super::HttpOptions::headers_max`] fields, `414` for a request line
//! longer than it takes. It has no hook for those answers. SPEC says every
//! error is JSON `{"error": …}` with the fitting code, and that too large is
//! `413`, so this wrapper around the connection's IO replaces them on their
//! way out: `400` stays `400` with a JSON reason, `431` and `414` become `413`.
//!
//! What it replaces is exactly hyper's automatic answer: a write that is the
//! whole head `HTTP/1.1 <code> <reason>\r\nconnection: close\r\ncontent-length:
//! 0\r\ndate: <date>\r\n\r\n` and nothing more, for one of those three codes. No
//! answer of the handlers is such a write: each error of theirs has a JSON body,
//! and none is 414 or 431. Only bytes of a job's log could match, if the log
//! ended in exactly such a head and the socket took the body up to just
//! before it in one write; that reader would get a JSON error instead of the
//! last bytes.
//!
//! hyper closes the connection after its answer, often with the rest of a
//! huge head still unread. Closing a socket with unread data makes the kernel
//! reset it, and the reset can destroy the answer before the client reads it;
//! the same goes for a body refused as too large. So a connection the front
//! door ends is drained for a moment before it closes ([`linger`]), as web
//! servers do.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::metrics::HttpMetrics;
use super::HttpOptions;

/// When the front door ends a connection, what the client still sends is read
/// and thrown away up to this many bytes, within [`LINGER_TIME`], before it
/// closes: enough for a client that writes a whole oversized body before it
/// reads the 413.
const LINGER_BYTES_MAX: usize = 64 * 1024 * 1024;

/// How long a connection the front door ends may linger at most.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// The statuses hyper answers parse errors with, and what each becomes.
const REPLACED: [(&str, StatusCode); 3] = [
    ("400 Bad Request", StatusCode::BAD_REQUEST),
    ("414 URI Too Long", StatusCode::PAYLOAD_TOO_LARGE),
    ("431 Request Header Fields Too Large", StatusCode::PAYLOAD_TOO_LARGE),
];

/// The JSON answers that stand for hyper's, made once per front door.
#[derive(Debug)]
pub(super) struct Answers {
    bad_request: Vec<u8>,
    too_large: Vec<u8>,
    metrics: Arc<HttpMetrics>,
}

impl Answers {
    pub(super) fn new(options: &HttpOptions) -> Answers {
        let too_large = format!(
            "the request head is too large: its request line and headers may take at most {} bytes and {} header \
             fields (a start's params can also go in a JSON body)",
            options.header_bytes_max, options.headers_max
        );
        Answers {
            bad_request: answer(StatusCode::BAD_REQUEST, "the request is not valid HTTP/1.1"),
            too_large: answer(StatusCode::PAYLOAD_TOO_LARGE, &too_large),
            metrics: options.metrics.clone(),
        }
    }
}

/// A whole answer: head and JSON body, closing the connection.
pub(super) fn answer(status: StatusCode, error: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": error }).to_string();
    let reason = status.canonical_reason().unwrap_or("");
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    )
    .into_bytes()
}

/// The status `written` stands for if it is exactly hyper's automatic answer
/// to a parse error (see the module docs), else `None`.
fn automatic_status(written: &[u8]) -> Option<StatusCode> {
    let rest = written.strip_prefix(b"HTTP/1.1 ")?;
    let (status, rest) = REPLACED.iter().find_map(|(line, status)| {
        let rest = rest.strip_prefix(line.as_bytes())?;
        Some((*status, rest))
    })?;
    let date = rest.strip_prefix(b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ")?.strip_suffix(b"\r\n\r\n")?;
    // An HTTP date, `Mon, 07 Dec 2026 15:43:43 GMT`: 29 bytes, no line break.
    (date.len() == 29 && date.ends_with(b" GMT") && !date.contains(&b'\r')).then_some(status)
}

/// Which of [`Answers`] is being written.
#[derive(Debug, Clone, Copy)]
enum Which {
    BadRequest,
    TooLarge,
}

/// A replacement on its way out.
#[derive(Debug, Clone, Copy)]
struct Replacing {
    which: Which,
    /// Its bytes written so far.
    out: usize,
    /// The length of hyper's answer, reported as written once the replacement is out.
    stands_for: usize,
}

/// The connection's IO, with hyper's parse-error answers replaced (module docs).
pub(super) struct JsonErrors<S> {
    io: S,
    answers: Arc<Answers>,
    replacing: Option<Replacing>,
}

impl<S> JsonErrors<S> {
    pub(super) fn new(io: S, answers: Arc<Answers>) -> JsonErrors<S> {
        JsonErrors { io, answers, replacing: None }
    }

    pub(super) fn into_inner(self) -> S {
        self.io
    }

    /// Starts replacing `written` if it is hyper's answer to a parse error.
    fn start_replacing(&mut self, written: &[u8]) -> bool {
        if self.replacing.is_some() {
            return true;
        }
        let Some(status) = automatic_status(written) else { return false };
        self.answers.metrics.record(status);
        let which = if status == StatusCode::BAD_REQUEST { Which::BadRequest } else { Which::TooLarge };
        self.replacing = Some(Replacing { which, out: 0, stands_for: written.len() });
        true
    }
}

impl<S: AsyncWrite + Unpin> JsonErrors<S> {
    /// Writes the rest of the replacement; ready with hyper's length once all of it is out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some(replacing) = self.replacing {
            let bytes = match replacing.which {
                Which::BadRequest => &self.answers.bad_request,
                Which::TooLarge => &self.answers.too_large,
            };
            let Some(rest) = bytes.get(replacing.out..).filter(|rest| !rest.is_empty()) else {
                self.replacing = None;
                return Poll::Ready(Ok(replacing.stands_for));
            };
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.replacing = Some(Replacing { out: replacing.out + n, ..replacing });
        }
        Poll::Ready(Ok(0))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.start_replacing(buf) {
            return this.poll_replacement(cx);
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next()) {
            if this.start_replacing(only) {
                return this.poll_replacement(cx);
            }
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Closes a connection the front door is done with: says so to the client,
/// then reads and throws away what it still sends, up to [`LINGER_BYTES_MAX`]
/// within [`LINGER_TIME`], so that closing does not reset the connection under
/// the last answer (module docs). A client that closed already costs one read.
pub(super) async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    // Our side is done writing (hyper may have said so already): a FIN tells the client.
    let _ = io.shutdown().await;
    let drain = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut left = LINGER_BYTES_MAX;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "Mon, 07 Dec 2026 15:43:43 GMT";

    fn automatic(line: &str) -> Vec<u8> {
        format!("HTTP/1.1 {line}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n").into_bytes()
    }

    #[test]
    fn hypers_automatic_answers_are_recognized() {
        assert_eq!(automatic_status(&automatic("400 Bad Request")), Some(StatusCode::BAD_REQUEST));
        assert_eq!(automatic_status(&automatic("414 URI Too Long")), Some(StatusCode::PAYLOAD_TOO_LARGE));
        assert_eq!(
            automatic_status(&automatic("431 Request Header Fields Too Large")),
            Some(StatusCode::PAYLOAD_TOO_LARGE)
        );
    }

    #[test]
    fn nothing_else_is_recognized() {
        // Other codes, other reasons, a body, bytes after the head, a head cut short.
        assert_eq!(automatic_status(&automatic("404 Not Found")), None);
        assert_eq!(automatic_status(&automatic("400 Bad Request Indeed")), None);
        let with_body = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(automatic_status(with_body.as_bytes()), None);
        let mut more = automatic("400 Bad Request");
        more.extend_from_slice(b"x");
        assert_eq!(automatic_status(&more), None);
        let whole = automatic("431 Request Header Fields Too Large");
        assert_eq!(automatic_status(&whole[..whole.len() - 2]), None);
        assert_eq!(automatic_status(b""), None);
    }

    #[test]
    fn the_answers_are_json_with_their_length() {
        let answers = Answers::new(&HttpOptions::default());
        for (bytes, code) in [(&answers.bad_request, "400"), (&answers.too_large, "413")] {
            let text = String::from_utf8(bytes.clone()).expect("ASCII");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
            assert!(head.starts_with(&format!("HTTP/1.1 {code} ")), "{head}");
            assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
            let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
            assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
        }
    }
}
