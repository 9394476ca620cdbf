//! Where the output of a job attempt goes: the log file (appended and flushed
//! chunk by chunk so it can be tailed while it grows), a bounded in-memory tail,
//! and an optional channel for live streaming.
//!
//! All steps of an attempt and the runner's own `jobz: ...` lines go through
//! one [`Sink`], so the log reads in the order things happened.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::RunError;

/// The last bytes of the output, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct Tail {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Whether bytes were ever dropped from the front. Only then can the first
    /// kept byte be in the middle of a UTF-8 sequence.
    truncated: bool,
}

impl Tail {
    /// Grows as output comes, up to `capacity`: most jobs write little or
    /// nothing, and a 64 KiB buffer made up front for every attempt cost each
    /// of them a large allocation, whose free sends glibc's allocator into
    /// consolidating its free lists.
    pub(crate) fn new(capacity: usize) -> Tail {
        Tail { bytes: VecDeque::new(), capacity, truncated: false }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let chunk = if chunk.len() > self.capacity {
            self.bytes.clear();
            self.truncated = true;
            &chunk[chunk.len() - self.capacity..]
        } else {
            chunk
        };
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.capacity);
        if overflow > 0 {
            self.bytes.drain(..overflow);
            self.truncated = true;
        }
        self.bytes.extend(chunk);
        debug_assert!(self.bytes.len() <= self.capacity);
    }

    /// The tail as text: invalid UTF-8 is replaced, a character cut in half by
    /// the truncation is dropped, and the result is never longer than the
    /// capacity in bytes (replacement characters can make text longer than
    /// the bytes it came from, so the front is cut again at a char boundary).
    pub(crate) fn to_text(&self) -> String {
        let (front, back) = self.bytes.as_slices();
        let mut bytes = Vec::with_capacity(front.len() + back.len());
        bytes.extend_from_slice(front);
        bytes.extend_from_slice(back);
        let mut start = 0;
        if self.truncated {
            // A UTF-8 sequence is at most 4 bytes, so at most 3 continuation
            // bytes (0b10xx_xxxx) can be left over from a cut character.
            while start < bytes.len().min(3) && bytes[start] & 0b1100_0000 == 0b1000_0000 {
                start += 1;
            }
        }
        let text = String::from_utf8_lossy(&bytes[start..]);
        if text.len() <= self.capacity {
            return text.into_owned();
        }
        let mut cut = text.len() - self.capacity;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text[cut..].to_owned()
    }
}

/// Everything the output of one attempt is written to.
#[derive(Debug)]
pub(crate) struct Sink {
    log: Option<LogFile>,
    tail: Tail,
    channel: Option<mpsc::Sender<Vec<u8>>>,
    bytes_total: u64,
    /// Whether the last byte written was a newline (or nothing was written),
    /// so that the runner's own lines always start on a line of their own.
    at_line_start: bool,
}

#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    file: tokio::fs::File,
}

impl Sink {
    /// Opens (creating or appending to) the log file, if there is one. Failing
    /// to open it is the only error: once the job runs, output problems are
    /// reported in the output, never by aborting the job.
    pub(crate) async fn open(
        log_path: Option<&Path>,
        channel: Option<mpsc::Sender<Vec<u8>>>,
        tail_capacity: usize,
    ) -> Result<Sink, RunError> {
        let log = match log_path {
            None => None,
            Some(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| RunError::OpenLog { path: path.to_owned(), source })?;
                Some(LogFile { path: path.to_owned(), file })
            }
        };
        Ok(Sink { log, tail: Tail::new(tail_capacity), channel, bytes_total: 0, at_line_start: true })
    }

    /// Writes a chunk of output to the log (flushed, so readers of the file see
    /// it now), the tail and the channel.
    pub(crate) async fn write(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.record(chunk).await;
        let Some(log) = &mut self.log else {
            return;
        };
        let written = async {
            log.file.write_all(chunk).await?;
            log.file.flush().await
        }
        .await;
        if let Err(error) = written {
            // The job goes on without its log file: a full disk must not turn
            // into a failed job. The tail and the channel still say what
            // happened.
            tracing::warn!(
                path = %log.path.display(),
                %error,
                "cannot write job log; the job goes on without it"
            );
            let note = format!(
                "{}jobz: cannot write log file \"{}\": {error}\n",
                if self.at_line_start { "" } else { "\n" },
                log.path.display()
            );
            self.log = None;
            self.record(note.as_bytes()).await;
        }
    }

    /// Counts a chunk and passes it to the tail and the channel.
    async fn record(&mut self, chunk: &[u8]) {
        let Some(&last) = chunk.last() else {
            return;
        };
        self.bytes_total += chunk.len() as u64;
        self.at_line_start = last == b'\n';
        self.tail.push(chunk);
        if let Some(channel) = &self.channel {
            if channel.send(chunk.to_vec()).await.is_err() {
                // The receiver is gone; the job does not depend on it.
                self.channel = None;
            }
        }
    }

    /// Writes one line of the runner's own, starting on a fresh line.
    pub(crate) async fn line(&mut self, text: &str) {
        let mut line = String::with_capacity(text.len() + 2);
        if !self.at_line_start {
            line.push('\n');
        }
        line.push_str(text);
        line.push('\n');
        self.write(line.as_bytes()).await;
    }

    pub(crate) fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    pub(crate) fn tail_text(&self) -> String {
        self.tail.to_text()
    }
}

#[cfg(test)]
mod tests {
    use super::Tail;

    #[test]
    fn tail_keeps_last_bytes() {
        let mut tail = Tail::new(4);
        tail.push(b"abc");
        tail.push(b"def");
        assert_eq!(tail.to_text(), "cdef");
        tail.push(b"0123456789");
        assert_eq!(tail.to_text(), "6789");
    }

    #[test]
    fn tail_drops_char_cut_in_half() {
        let mut tail = Tail::new(5);
        // "é" is two bytes; six of them cut to five bytes starts mid-character.
        tail.push("éééééé".as_bytes());
        assert_eq!(tail.to_text(), "éé");
    }

    #[test]
    fn tail_keeps_invalid_start_when_not_truncated() {
        let mut tail = Tail::new(8);
        tail.push(&[0x80, b'a']);
        assert_eq!(tail.to_text(), "\u{fffd}a");
    }

    #[test]
    fn tail_text_never_exceeds_capacity() {
        let mut tail = Tail::new(4);
        // Each invalid byte becomes a three-byte replacement character.
        tail.push(&[0xff, 0xff, 0xff, b'z']);
        let text = tail.to_text();
        assert!(text.len() <= 4, "{text:?}");
        assert!(text.ends_with('z'));
    }
}
