//! Captured stdout/stderr of a plugin: the last `capacity` bytes are kept, the
//! rest counted and discarded, so a chatty plugin neither fails nor fills memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

#[derive(Clone)]
pub struct CapturedOutput {
    inner: Arc<Mutex<Captured>>,
}

struct Captured {
    tail: Vec<u8>,
    capacity: usize,
    discarded: u64,
}

impl CapturedOutput {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Captured {
                tail: Vec::new(),
                capacity,
                discarded: 0,
            })),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = self.inner.lock().unwrap();
        c.tail.extend_from_slice(bytes);
        let excess = c.tail.len().saturating_sub(c.capacity);
        if excess > 0 {
            c.tail.drain(..excess);
            c.discarded += excess as u64;
        }
    }

    /// The captured text since the last call, and how many earlier bytes were
    /// discarded; clears the buffer.
    pub fn take(&self) -> (String, u64) {
        let mut c = self.inner.lock().unwrap();
        let text = String::from_utf8_lossy(&std::mem::take(&mut c.tail)).into_owned();
        (text, std::mem::take(&mut c.discarded))
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail_and_counts_the_rest() {
        let out = CapturedOutput::new(4);
        out.push(b"abc");
        out.push(b"defg");
        assert_eq!(out.take(), ("defg".to_string(), 3));
        assert_eq!(out.take(), (String::new(), 0));
    }
}
