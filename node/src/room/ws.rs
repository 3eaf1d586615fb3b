//! WebSocket transport: a WebSocket connection seen as the byte stream the client protocol runs
//! on, so `conn::serve` handles it like TCP and TLS.
//!
//! Every binary WebSocket message carries whole frames (4-byte length + `Frame`, as on TCP):
//! the server sends each batch the connection task writes (`write_all` + `flush`) as one binary
//! message; a client may put one or more whole frames in a message (a frame split over messages
//! is also accepted: the stream is simply the concatenation of the messages' bytes). Text
//! messages are a protocol error (the connection ends); pings are answered by the WebSocket
//! layer; a close message ends the stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The most bytes one WebSocket message from a client may carry: one protocol frame of the
/// node's maximum size with its length prefix. tungstenite checks a WebSocket frame's announced
/// length before it reads (or reserves room for) the payload, and the sum of a fragmented
/// message's parts as they arrive, so a larger message is refused before it is buffered.
pub fn max_message(max_frame: usize) -> usize {
    max_frame.saturating_add(herald_proto::frame::HEADER_LEN)
}

/// WebSocket settings of the server side, for a node whose frame limit is `max_frame`.
pub fn config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message(max_frame)))
        .max_frame_size(Some(max_message(max_frame)))
}

/// A WebSocket as an `AsyncRead + AsyncWrite` byte stream (see the module docs).
///
/// A message over [`max_message`] is refused by tungstenite before it is buffered; the stream
/// then yields a frame header announcing the message's size and ends, so the connection answers
/// it like an oversized frame on TCP (ERROR `FRAME_TOO_LARGE`, close).
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the last binary message received.
    rbuf: Bytes,
    /// Bytes written since the last flush; sent as one binary message by `poll_flush`.
    wbuf: BytesMut,
    /// Set once the peer closed (or sent something we refuse): reads return EOF.
    eof: bool,
}

impl<S> WsStream<S> {
    pub fn new(inner: WebSocketStream<S>) -> Self {
        WsStream {
            inner,
            rbuf: Bytes::new(),
            wbuf: BytesMut::new(),
            eof: false,
        }
    }
}

fn io_err(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::Error::new(io::ErrorKind::BrokenPipe, e),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.rbuf.is_empty() {
                let n = this.rbuf.len().min(buf.remaining());
                buf.put_slice(&this.rbuf[..n]);
                this.rbuf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.rbuf = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Ok(Message::Text(_))) => {
                    this.eof = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket messages are not part of the protocol; send frames as binary messages",
                    )));
                }
                Some(Err(WsError::ConnectionClosed)) => this.eof = true,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. }))) => {
                    this.eof = true;
                    let announced = u32::try_from(size).unwrap_or(u32::MAX);
                    this.rbuf = Bytes::copy_from_slice(&announced.to_be_bytes());
                }
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Collected until flush, so one flush is one message of whole frames.
        self.wbuf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.wbuf.is_empty() {
            ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(io_err)?;
            let msg = Message::Binary(this.wbuf.split().freeze());
            Pin::new(&mut this.inner).start_send(msg).map_err(io_err)?;
        }
        Pin::new(&mut this.inner).poll_flush(cx).map_err(io_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        match ready!(Pin::new(&mut self.inner).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io_err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    #[tokio::test]
    async fn one_flush_is_one_binary_message_and_messages_concatenate() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(config(1024))).await;
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut s = WsStream::new(server);

        s.write_all(b"\x00\x00\x00\x02hi").await.unwrap();
        s.write_all(b"\x00\x00\x00\x01!").await.unwrap();
        s.flush().await.unwrap();
        match client.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert_eq!(&b[..], b"\x00\x00\x00\x02hi\x00\x00\x00\x01!"),
            other => panic!("unexpected {other:?}"),
        }

        client
            .send(Message::Binary(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"def")))
            .await
            .unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdef");

        client.send(Message::Text("nope".into())).await.unwrap();
        let mut more = [0u8; 1];
        assert!(s.read(&mut more).await.is_err(), "text messages are refused");
        assert_eq!(
            s.read(&mut more).await.unwrap(),
            0,
            "then the stream is at its end"
        );
    }
    /// The frame header the connection sees in place of an oversized message: the message's
    /// length, which `frame::decode` refuses as too large.
    fn announced(b: &[u8]) -> usize {
        u32::from_be_bytes(b.try_into().unwrap()) as usize
    }

    #[tokio::test]
    async fn a_message_over_the_frame_limit_is_refused_before_its_payload_arrives() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(config(1024))).await;
        let mut s = WsStream::new(server);
        // A masked binary frame announcing 1 GiB, and nothing of its payload: the refusal must not
        // wait for (or reserve room for) the payload.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        b.write_all(&header).await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("refused at once, not after the payload")
            .unwrap();
        assert_eq!(announced(&got), 1 << 30);
        let mut buf = bytes::BytesMut::from(&got[..]);
        assert!(matches!(
            herald_proto::frame::decode(&mut buf, 1024),
            Err(herald_proto::frame::FrameError::TooLarge { .. })
        ));
        let mut more = [0u8; 1];
        assert_eq!(s.read(&mut more).await.unwrap(), 0, "then the stream ends");
    }

    #[tokio::test]
    async fn a_message_of_one_whole_max_frame_passes_and_one_byte_more_does_not() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(config(1024))).await;
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut s = WsStream::new(server);
        let limit = max_message(1024);
        assert_eq!(limit, 1028, "a max frame and its length prefix");
        client
            .send(Message::Binary(vec![7u8; limit].into()))
            .await
            .unwrap();
        let mut got = vec![0u8; limit];
        s.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|b| *b == 7));
        client
            .send(Message::Binary(vec![7u8; limit + 1].into()))
            .await
            .unwrap();
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(announced(&head), limit + 1);
        let mut more = [0u8; 1];
        assert_eq!(s.read(&mut more).await.unwrap(), 0, "then the stream ends");
    }
}
