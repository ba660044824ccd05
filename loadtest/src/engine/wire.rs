//! The receive side of one connection: a read buffer, the protocol core's [`Assembler`], and the
//! unconsumed tail kept between reads (as `tests/support` drives it). Also the few frames the
//! client writes besides messages.
//!
//! Must never: re-implement any part of RFC 6455 (framing and validation are `ringgate::proto`'s),
//! allocate per message, or let a read buffer be lost (a read future is always driven to the
//! end, never dropped: tokio-uring would keep the buffer).

use std::io;
use std::net::Shutdown;
use std::pin::{Pin, pin};

use ringgate::proto::ProtocolError;
use ringgate::proto::close::{CloseCode, write_close_body};
use ringgate::proto::frame::{OpCode, write_frame};
use ringgate::proto::message::{Assembler, Event, Limits, Role};
use tokio::time::Sleep;
use tokio_uring::net::TcpStream;

use super::race::{Either, race};
use super::sockops::{recv_more, send_all};

/// Bytes read at once: many echoes of typical size per read, while 10,000 connections hold only
/// 40 MB. Larger messages stream through the assembler in pieces.
pub const READ_BUFFER: usize = 4 * 1024;

/// A connection's receive state.
pub struct FrameReader {
    buf: Vec<u8>,
    assembler: Assembler,
}

impl FrameReader {
    /// A reader whose buffer already holds `buf` (bytes that followed the handshake response).
    pub fn new(mut buf: Vec<u8>, max_message: usize) -> FrameReader {
        if buf.capacity() < READ_BUFFER {
            buf.reserve(READ_BUFFER - buf.len());
        }
        let limits = Limits { max_message_size: max_message, max_frame_size: max_message };
        FrameReader { buf, assembler: Assembler::new(Role::Client, limits) }
    }

    /// Reads more bytes after the kept tail. `Ok(0)` is end of stream.
    pub async fn fill(&mut self, stream: &TcpStream) -> io::Result<usize> {
        let (result, buf) = read_more(stream, self.take_buffer()).await;
        self.restore(buf);
        result
    }

    /// Lends the buffer (kept tail first, room after it) to a [`read_more`] that must outlive a
    /// borrow of the reader; give it back with [`FrameReader::restore`] before draining.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(READ_BUFFER);
        }
        std::mem::take(&mut self.buf)
    }

    /// Takes back the buffer lent by [`FrameReader::take_buffer`], with the bytes read appended.
    pub fn restore(&mut self, buf: Vec<u8>) {
        self.buf = buf;
    }

    /// Hands every complete event in the buffer to `on_event`, then keeps only the unconsumed
    /// tail. Stops early (leaving the rest unread) when `on_event` returns `false`.
    pub fn drain(&mut self, mut on_event: impl FnMut(Event<'_>) -> bool) -> Result<(), ProtocolError> {
        let mut start = 0;
        let len = self.buf.len();
        let mut keep_going = true;
        while keep_going && start < len {
            let progress = self.assembler.feed(&mut self.buf[start..len])?;
            let consumed = progress.consumed;
            let had_event = progress.event.is_some();
            if let Some(event) = progress.event {
                keep_going = on_event(event);
            }
            start += consumed;
            if consumed == 0 && !had_event {
                break;
            }
        }
        self.buf.copy_within(start..len, 0);
        self.buf.truncate(len - start);
        Ok(())
    }
}

/// Reads into `buf` after its current contents. Owns the buffer (tokio-uring needs it for the
/// op's lifetime) and hands it back with the result, so the future borrows nothing but the stream.
pub async fn read_more(stream: &TcpStream, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    recv_more(stream, buf).await
}

/// A fresh masking key; RFC 6455 section 5.3 wants it unpredictable per frame.
pub fn mask_key() -> [u8; 4] {
    fastrand::u32(..).to_ne_bytes()
}

/// Appends a masked Pong answering a Ping's payload.
pub fn put_pong(dst: &mut Vec<u8>, ping: &[u8]) {
    write_frame(dst, OpCode::Pong, ping, Some(mask_key()));
}

/// Appends a masked Close frame with status 1000 (normal closure).
pub fn put_close(dst: &mut Vec<u8>) {
    let mut body = [0u8; 125];
    let len = write_close_body(&mut body, CloseCode::NORMAL, "loadtest done");
    write_frame(dst, OpCode::Close, &body[..len], Some(mask_key()));
}

/// Sends our Close frame. A failure means the connection is already gone, which is fine here.
pub async fn send_close(stream: &TcpStream) -> bool {
    let mut out = Vec::with_capacity(32);
    put_close(&mut out);
    send_all(stream, out).await.0.is_ok()
}

/// After our Close: reads until the server's Close, the end of the stream, or `deadline`; on the
/// deadline the socket is shut down so the pending read ends.
pub async fn await_close(stream: &TcpStream, reader: &mut FrameReader, mut deadline: Pin<&mut Sleep>) {
    loop {
        let mut closed = false;
        let drained = reader.drain(|event| {
            closed = matches!(event, Event::Close(_));
            !closed
        });
        if closed || drained.is_err() {
            return;
        }
        let read = pin!(reader.fill(stream));
        match race(read, deadline.as_mut()).await {
            Either::Left(Ok(n)) if n > 0 => {}
            Either::Left(_) => return,
            Either::Right(read) => {
                let _ = stream.shutdown(Shutdown::Both);
                let _ = read.await;
                return;
            }
        }
    }
}
