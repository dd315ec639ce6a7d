//! Problem documents for the answers actix's HTTP/1 parser gives on its own.
//!
//! A request head that is too large (over 128 KiB or more than 96 headers: 431), that cannot be
//! parsed (400), or that does not arrive within the client request timeout (408) is answered from
//! inside actix-http's dispatcher, with an empty body, before any middleware or handler runs — so
//! the API's problem+json rendering never sees it. [`ProblemIo`] wraps each connection's socket
//! and replaces exactly those empty answers with a problem document on their way out.
//!
//! They are recognised by shape: a response head with status 400, 408 or 431, `content-length: 0`
//! and no `content-type`. The API never sends such a head (its errors always carry a problem
//! body), so nothing the handlers wrote is touched. The dispatcher writes these answers last on a
//! connection, at the start of a write once the previous response has been flushed; a pipelined
//! request behind another one's unflushed response keeps actix's empty answer.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::problem::{ApiError, PROBLEM_CONTENT_TYPE, ProblemKind};

/// The request line of a connection's first request, kept to name `instance`; longer lines are
/// not worth keeping (the problem would only quote a bounded part).
const MAX_REQUEST_LINE: usize = 2048;

/// A connection whose parser-level error answers are rewritten as problem documents.
pub struct ProblemIo<T> {
    inner: T,
    /// The replacement answer still to be written, and how much of it is written.
    pending: Vec<u8>,
    written: usize,
    /// Whether any response has started on this connection (after that, `first_line` is stale).
    responded: bool,
    /// The first bytes read, up to the end of the first request line.
    first_line: Vec<u8>,
}

impl<T> ProblemIo<T> {
    pub fn new(inner: T) -> Self {
        ProblemIo {
            inner,
            pending: Vec::new(),
            written: 0,
            responded: false,
            first_line: Vec::new(),
        }
    }

    /// The path of the first request, when this answer is about it and its line was readable.
    fn instance(&self) -> String {
        if self.responded {
            return String::new();
        }
        let line = String::from_utf8_lossy(&self.first_line);
        let target = line.split(' ').nth(1).unwrap_or_default();
        let path = target.split(['?', '#']).next().unwrap_or_default();
        if path.starts_with('/') {
            path.chars().take(200).collect()
        } else {
            String::new()
        }
    }
}

/// Which problem replaces the head at the start of `buf`, and the head's length, if `buf` starts
/// with one of the parser's empty answers.
fn parser_answer(buf: &[u8]) -> Option<(ProblemKind, usize)> {
    let status_line = buf.get(..13)?;
    if !(status_line.starts_with(b"HTTP/1.1 ") || status_line.starts_with(b"HTTP/1.0 ")) {
        return None;
    }
    let kind = match &status_line[9..12] {
        b"431" => ProblemKind::RequestHeadersTooLarge,
        b"400" => ProblemKind::MalformedRequest,
        b"408" => ProblemKind::RequestTimeout,
        _ => return None,
    };
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let empty = head.contains("\r\ncontent-length: 0\r\n") && !head.contains("\r\ncontent-type:");
    empty.then_some((kind, end))
}

fn detail(kind: ProblemKind) -> &'static str {
    match kind {
        ProblemKind::RequestHeadersTooLarge => {
            "the request head is too large: at most 96 header fields and 128 KiB in all; a bearer token or cookie may have grown too big"
        }
        ProblemKind::RequestTimeout => {
            "the request head did not arrive in time; send the whole head promptly"
        }
        _ => "the request is not valid HTTP/1.1 and could not be parsed",
    }
}

/// The whole replacement response: the problem document, its request id, and `Connection: close`
/// (the dispatcher closes the connection after these answers).
fn problem_response(kind: ProblemKind, instance: &str) -> Vec<u8> {
    let request_id = uuid::Uuid::new_v4().to_string();
    tracing::info!(
        request_id = %request_id,
        status = kind.status().as_u16(),
        code = kind.code(),
        "request refused by the HTTP parser"
    );
    let problem = ApiError::new(kind, detail(kind)).to_problem(instance, &request_id);
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let status = kind.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {PROBLEM_CONTENT_TYPE}\r\ncontent-length: {}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len(),
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    /// Write what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.responded
            && this.first_line.len() < MAX_REQUEST_LINE
            && !this.first_line.contains(&b'\n')
        {
            let room = MAX_REQUEST_LINE - this.first_line.len();
            let fresh = &buf.filled()[before..];
            this.first_line
                .extend_from_slice(&fresh[..fresh.len().min(room)]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some((kind, head_len)) = parser_answer(buf) {
            this.pending = problem_response(kind, &this.instance());
            this.written = 0;
            this.responded = true;
            // The empty head is consumed; the flush (or the next write) sends the replacement.
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(head_len));
        }
        this.responded = true;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_the_parsers_empty_answers() {
        let head =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(
            parser_answer(head),
            Some((ProblemKind::RequestHeadersTooLarge, head.len()))
        );
        let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parser_answer(bad).map(|(k, _)| k),
            Some(ProblemKind::MalformedRequest)
        );
        // The API's own 400s carry a problem body and a content type: left alone.
        let api = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 120\r\ncontent-type: application/problem+json\r\n\r\n{}";
        assert_eq!(parser_answer(api), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parser_answer(ok), None);
        // A head cut short is not guessed at.
        assert_eq!(parser_answer(b"HTTP/1.1 431 Request"), None);
    }

    #[test]
    fn the_replacement_is_a_problem_document() {
        let out = problem_response(ProblemKind::RequestHeadersTooLarge, "/v1/tenants");
        let text = String::from_utf8(out).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("content-type: application/problem+json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let problem: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(problem["code"], "request_headers_too_large");
        assert_eq!(problem["status"], 431);
        assert_eq!(problem["instance"], "/v1/tenants");
        assert!(
            problem["request_id"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
    }
}
