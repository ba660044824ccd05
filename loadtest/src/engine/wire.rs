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

use super::CLOSE_TIMEOUT;
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
        let (result, buf) = recv_more(stream, self.take_buffer()).await;
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

    /// Hands every complete data message to `on_message`, answers Pings into `control`, ignores
    /// Pongs and stops at a Close (leaving anything after it unread): the event handling every load
    /// mode shares.
    pub fn drain_messages(&mut self, control: &mut Vec<u8>, mut on_message: impl FnMut(&[u8])) -> Drained {
        let mut close_code = None;
        let drained = self.drain(|event| {
            match event {
                Event::Message { payload, .. } => on_message(payload),
                Event::Ping(data) => put_pong(control, data),
                Event::Pong(_) => {}
                Event::Close(frame) => {
                    close_code = Some(frame.map_or(0, |f| f.code.0));
                    return false;
                }
            }
            true
        });
        match (drained, close_code) {
            (Err(_), _) => Drained::Broken,
            (Ok(()), Some(code)) => Drained::Closed(code),
            (Ok(()), None) => Drained::Open,
        }
    }
}

/// How [`FrameReader::drain_messages`] left the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Everything complete was handled; more may come.
    Open,
    /// The server sent a Close, with this code (0 when it had none).
    Closed(u16),
    /// The server broke the protocol.
    Broken,
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

/// Ends a connection whose read (`read`, the reader's buffer lent to it) is still pending. When
/// `clean`, sends our Close first: the read completes with the server's answer and the closing
/// handshake is finished; otherwise the socket is shut down. Either way the read is driven to its
/// end, within the close timeout.
pub async fn close_while_reading<F>(
    stream: &TcpStream,
    reader: &mut FrameReader,
    read: Pin<&mut F>,
    clean: bool,
) where
    F: Future<Output = (io::Result<usize>, Vec<u8>)>,
{
    if clean {
        let _ = send_close(stream).await;
    } else {
        let _ = stream.shutdown(Shutdown::Both);
    }
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    match race(read, pin!(tokio::time::sleep_until(deadline))).await {
        Either::Left((Ok(n), buf)) if n > 0 => {
            reader.restore(buf);
            await_close(stream, reader, pin!(tokio::time::sleep_until(deadline))).await;
        }
        Either::Left((_, buf)) => reader.restore(buf),
        Either::Right(read) => {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = read.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use ringgate::proto::close::{CloseCode, write_close_body};
    use ringgate::proto::frame::{OpCode, write_frame};

    use super::{Drained, FrameReader};

    fn server_frames(frames: &[(OpCode, &[u8])]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (opcode, payload) in frames {
            write_frame(&mut bytes, *opcode, payload, None);
        }
        bytes
    }

    #[test]
    fn messages_are_handed_over_pings_answered_and_a_close_stops_the_drain() {
        let mut close = [0u8; 125];
        let close_len = write_close_body(&mut close, CloseCode::GOING_AWAY, "bye");
        let bytes = server_frames(&[
            (OpCode::Text, b"a"),
            (OpCode::Ping, b"p"),
            (OpCode::Pong, b"ignored"),
            (OpCode::Text, b"b"),
            (OpCode::Close, &close[..close_len]),
            (OpCode::Text, b"after the close"),
        ]);
        let mut reader = FrameReader::new(bytes, 1 << 20);
        let mut control = Vec::new();
        let mut messages = Vec::new();
        let drained = reader.drain_messages(&mut control, |payload| messages.push(payload.to_vec()));
        assert_eq!(drained, Drained::Closed(1001));
        assert_eq!(messages, [b"a".to_vec(), b"b".to_vec()]);
        // One masked Pong carrying the Ping's payload: 2 header bytes, 4 key bytes, 1 payload byte.
        assert_eq!(control.len(), 7);
        assert_eq!(control[0], 0x80 | 0xA);
        assert_eq!(control[6] ^ control[2], b'p');
        assert!(!reader.take_buffer().is_empty(), "the frame after the Close stays unread");
    }

    #[test]
    fn a_protocol_error_is_broken_and_a_partial_frame_waits() {
        let mut reader = FrameReader::new(vec![0x81, 0x05, b'h', b'e'], 1 << 20);
        let mut control = Vec::new();
        assert_eq!(reader.drain_messages(&mut control, |_| panic!("not complete yet")), Drained::Open);
        // A reserved opcode (0x3).
        let mut broken = FrameReader::new(vec![0x83, 0x00], 1 << 20);
        assert_eq!(broken.drain_messages(&mut control, |_| {}), Drained::Broken);
        assert!(control.is_empty());
    }
}
