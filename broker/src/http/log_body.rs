//! [`LogBody`]: a response body that streams a byte range of a log file.
//!
//! A job's log may be large and still growing, so it is neither read into
//! memory nor streamed "to the end": the range is fixed when the request
//! arrives (offset to the size then), which makes `Jobz-Next-Offset` exact and
//! lets `jobz logs --follow` poll for the rest.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

use super::limits::LOG_FRAME_BYTES;

/// Streams `remaining` bytes from the file's current position, in frames of at
/// most [`LOG_FRAME_BYTES`].
pub struct LogBody {
    file: tokio::fs::File,
    remaining: u64,
    buffer: BytesMut,
}

impl LogBody {
    /// `file` must already be positioned at the start of the range.
    pub fn new(file: tokio::fs::File, length: u64) -> LogBody {
        LogBody { file, remaining: length, buffer: BytesMut::new() }
    }
}

impl Body for LogBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.remaining).unwrap_or(usize::MAX).min(LOG_FRAME_BYTES);
        this.buffer.resize(want, 0);
        let mut read = ReadBuf::new(&mut this.buffer[..want]);
        ready!(Pin::new(&mut this.file).poll_read(cx, &mut read))?;
        let got = read.filled().len();
        if got == 0 {
            // The file is shorter than it was when the request came in (it was
            // truncated). End the body; hyper sees the short length and closes
            // the connection, so the client knows the answer is incomplete.
            this.remaining = 0;
            return Poll::Ready(None);
        }
        this.remaining -= got as u64;
        let data = this.buffer.split_to(got).freeze();
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
