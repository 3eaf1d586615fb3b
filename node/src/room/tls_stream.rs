//! TLS on client connections through rustls's unbuffered API, so an idle connection holds no
//! buffer.
//!
//! The buffered `ServerConnection` (what tokio-rustls drives) keeps a read buffer of at least
//! 4 KiB for the life of every connection: rustls shrinks it back to 4 KiB, never below. With
//! hundreds of thousands of idle phones that was about half of a TLS connection's memory. Here
//! the three buffers are ours and each is freed the moment it is empty: TLS bytes received but
//! not yet processed (`incoming`; only a partial record stays), plaintext decrypted but not yet
//! read (`plain`), and records encrypted but not yet sent (`outgoing`).
//!
//! Bounded: `incoming` holds at most one record or handshake flight ([`IN_LIMIT`]); a writer waits
//! for the socket once [`OUT_LIMIT`] bytes are queued.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes read from the socket per read call (one full TLS record and its overhead).
const READ_CHUNK: usize = 16 * 1024 + 512;
/// Unprocessed TLS bytes held at most: rustls accepts handshake messages up to 64 KiB.
const IN_LIMIT: usize = 64 * 1024 + READ_CHUNK;
/// Encrypted bytes queued before `poll_write` waits for the socket to take them.
const OUT_LIMIT: usize = 64 * 1024;

/// A server-side TLS stream over a TCP socket.
pub struct LeanTls {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    plain: Vec<u8>,
    plain_pos: usize,
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent close_notify or closed its side of the socket.
    eof: bool,
    /// Our close_notify is queued.
    close_queued: bool,
}

/// What the connection needs after its input was processed.
enum Next {
    /// More bytes from the peer (a partial record, or the handshake waits for the peer).
    Read,
    /// Both sides have sent close_notify.
    Closed,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs `f` on the free tail of `buf` (grown to what `f` says it needs) and keeps what it wrote.
fn append_with<E>(
    buf: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    too_small: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = buf.len();
    let mut want = 256;
    loop {
        buf.resize(start + want, 0);
        match f(&mut buf[start..]) {
            Ok(n) => {
                buf.truncate(start + n);
                return Ok(());
            }
            Err(e) => match too_small(&e) {
                Some(required) if required > want => want = required,
                _ => {
                    buf.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

fn encode_too_small(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
        _ => None,
    }
}

fn encrypt_too_small(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
        _ => None,
    }
}

fn other(e: impl std::fmt::Debug) -> io::Error {
    io::Error::other(format!("tls: {e:?}"))
}

impl LeanTls {
    /// Runs the server handshake on `io`. The caller bounds it with a timeout.
    pub async fn accept(io: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_err)?;
        let mut s = LeanTls {
            io,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            eof: false,
            close_queued: false,
        };
        loop {
            let next = s.process()?;
            std::future::poll_fn(|cx| s.poll_send(cx)).await?;
            if !s.conn.is_handshaking() {
                return Ok(s);
            }
            if matches!(next, Next::Closed) || s.eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls: the peer closed during the handshake",
                ));
            }
            let n = std::future::poll_fn(|cx| s.poll_fill(cx)).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls: the peer closed during the handshake",
                ));
            }
        }
    }

    /// Feeds `incoming` to rustls until it needs more input: decrypted data goes to `plain`,
    /// records to send go to `outgoing`, consumed input is dropped.
    fn process(&mut self) -> io::Result<Next> {
        loop {
            let status = self.conn.process_tls_records(&mut self.incoming[..]);
            let mut discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    self.drop_incoming(discard);
                    return Err(tls_err(e));
                }
            };
            let next = match absorb(
                state,
                &mut self.plain,
                &mut self.plain_pos,
                &mut self.outgoing,
                &mut self.eof,
            )? {
                Absorbed::Done(more) => {
                    discard += more;
                    None
                }
                Absorbed::Other(ConnectionState::Closed) => Some(Next::Closed),
                Absorbed::Other(ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_)) => {
                    Some(Next::Read)
                }
                Absorbed::Other(_) => return Err(other("unexpected connection state")),
            };
            self.drop_incoming(discard);
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }

    fn drop_incoming(&mut self, n: usize) {
        if n >= self.incoming.len() {
            // Free it: an idle connection holds no buffer.
            self.incoming = Vec::new();
        } else if n > 0 {
            self.incoming.drain(..n);
        }
    }

    /// Reads what the socket has into `incoming` and processes it; Ready(0) at the socket's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= IN_LIMIT {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "tls: record or handshake flight too large",
            )));
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            // Reads into spare capacity (no zeroing); the buffer is freed again once processed.
            self.incoming.reserve(READ_CHUNK);
            match self.io.try_read_buf(&mut self.incoming) {
                Ok(0) => {
                    self.eof = true;
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                    return Poll::Ready(Ok(0));
                }
                Ok(n) => {
                    self.process()?;
                    return Poll::Ready(Ok(n));
                }
                Err(e) => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }

    /// Writes `outgoing` to the socket; Ready once all of it is sent (the buffer is then freed).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outgoing = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Encrypts `data` (or a close_notify when `data` is None) into `outgoing`.
    fn seal(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        loop {
            let status = self.conn.process_tls_records(&mut self.incoming[..]);
            let mut discard = status.discard;
            let state = status.state.map_err(tls_err)?;
            let done = match absorb(
                state,
                &mut self.plain,
                &mut self.plain_pos,
                &mut self.outgoing,
                &mut self.eof,
            )? {
                Absorbed::Done(more) => {
                    discard += more;
                    false
                }
                Absorbed::Other(ConnectionState::WriteTraffic(mut w)) => {
                    match data {
                        Some(d) => append_with(&mut self.outgoing, |b| w.encrypt(d, b), encrypt_too_small),
                        None => {
                            append_with(&mut self.outgoing, |b| w.queue_close_notify(b), encrypt_too_small)
                        }
                    }
                    .map_err(other)?;
                    true
                }
                Absorbed::Other(ConnectionState::Closed) => {
                    self.drop_incoming(discard);
                    return match data {
                        Some(_) => Err(io::ErrorKind::BrokenPipe.into()),
                        None => Ok(()),
                    };
                }
                Absorbed::Other(_) => {
                    self.drop_incoming(discard);
                    return Err(other("cannot write: the handshake is not done"));
                }
            };
            self.drop_incoming(discard);
            if done {
                return Ok(());
            }
        }
    }
}

/// What [`absorb`] did with a connection state.
enum Absorbed<'c, 'i> {
    /// Handled; this many more input bytes are consumed.
    Done(usize),
    /// Left to the caller (write, wait for input, closed).
    Other(ConnectionState<'c, 'i, ServerConnectionData>),
}

/// The handling every caller of `process_tls_records` shares: decrypted records go to `plain`,
/// records rustls wants sent go to `outgoing` (in order; sent before the connection waits for
/// input), the peer's close_notify sets `eof`.
fn absorb<'c, 'i>(
    state: ConnectionState<'c, 'i, ServerConnectionData>,
    plain: &mut Vec<u8>,
    plain_pos: &mut usize,
    outgoing: &mut Vec<u8>,
    eof: &mut bool,
) -> io::Result<Absorbed<'c, 'i>> {
    let mut discard = 0;
    let mut take = |record: Result<rustls::unbuffered::AppDataRecord<'_>, rustls::Error>| {
        let record = record.map_err(tls_err)?;
        discard += record.discard;
        if *plain_pos == plain.len() {
            plain.clear();
            *plain_pos = 0;
        }
        plain.extend_from_slice(record.payload);
        Ok::<(), io::Error>(())
    };
    match state {
        ConnectionState::ReadTraffic(mut r) => {
            while let Some(record) = r.next_record() {
                take(record)?;
            }
        }
        // Early data is not enabled in our config; taken as data if a future config does.
        ConnectionState::ReadEarlyData(mut r) => {
            while let Some(record) = r.next_record() {
                take(record)?;
            }
        }
        ConnectionState::EncodeTlsData(mut e) => {
            append_with(outgoing, |b| e.encode(b), encode_too_small).map_err(other)?;
        }
        ConnectionState::TransmitTlsData(t) => t.done(),
        ConnectionState::PeerClosed => *eof = true,
        state => return Ok(Absorbed::Other(state)),
    }
    Ok(Absorbed::Done(discard))
}

impl AsyncRead for LeanTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Answers rustls queued while reading (key updates, tickets) go out first; if the
            // socket cannot take them now, it wakes this task when it can.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for LeanTls {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.outgoing.len() - this.out_pos >= OUT_LIMIT {
            ready!(this.poll_send(cx))?;
        }
        this.seal(Some(data))?;
        // Start sending now; what the socket does not take waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.close_queued {
            this.seal(None)?;
            this.close_queued = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn configs(dir: &std::path::Path, tls12: bool) -> (Arc<ServerConfig>, tokio_rustls::TlsConnector) {
        let pki = super::super::tls::dev_pki(dir).unwrap();
        let server = super::super::tls::server_config(&pki.cert, &pki.key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(&pki.ca).unwrap();
        for cert in rustls_pemfile::certs(&mut &ca[..]) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider);
        let builder = if tls12 {
            builder
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
        } else {
            builder.with_safe_default_protocol_versions().unwrap()
        };
        let client = builder.with_root_certificates(roots).with_no_client_auth();
        (server, tokio_rustls::TlsConnector::from(Arc::new(client)))
    }

    async fn pair(
        server: Arc<ServerConfig>,
        connector: &tokio_rustls::TlsConnector,
    ) -> (LeanTls, tokio_rustls::client::TlsStream<TcpStream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            LeanTls::accept(s, server).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let client = connector.connect(name, tcp).await.unwrap();
        (accept.await.unwrap().unwrap(), client)
    }

    fn holds_no_buffer(s: &LeanTls) -> bool {
        s.incoming.capacity() == 0 && s.plain.capacity() == 0 && s.outgoing.capacity() == 0
    }

    /// Both directions carry more than a record and more than the write queue's limit, byte for
    /// byte; an idle connection then holds no buffer; close_notify ends both sides cleanly.
    async fn round_trip(tls12: bool) {
        let dir = tempfile::tempdir().unwrap();
        let (server, connector) = configs(dir.path(), tls12);
        let (mut s, mut c) = pair(server, &connector).await;
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client = tokio::spawn(async move {
            c.write_all(&up2).await.unwrap();
            c.flush().await.unwrap();
            let mut got = vec![0; down2.len()];
            c.read_exact(&mut got).await.unwrap();
            assert!(got == down2, "the server's bytes arrived changed");
            c
        });
        let mut got = vec![0; up.len()];
        s.read_exact(&mut got).await.unwrap();
        assert!(got == up, "the client's bytes arrived changed");
        for chunk in down.chunks(7_000) {
            s.write_all(chunk).await.unwrap();
        }
        s.flush().await.unwrap();
        let mut c = client.await.unwrap();
        assert!(holds_no_buffer(&s), "an idle connection holds a buffer");

        // The client closes: the server reads the end (close_notify), then closes too.
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .await
            .expect("a clean close_notify from the server");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn tls13_carries_data_both_ways_and_idles_without_buffers() {
        round_trip(false).await;
    }

    #[tokio::test]
    async fn tls12_carries_data_both_ways_and_idles_without_buffers() {
        round_trip(true).await;
    }

    #[tokio::test]
    async fn a_client_that_does_not_speak_tls_gets_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (server, _) = configs(dir.path(), false);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            LeanTls::accept(s, server).await
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(accept.await.unwrap().is_err());

        // A peer that hangs up halfway through the handshake: an error too.
        let dir = tempfile::tempdir().unwrap();
        let (server, _) = configs(dir.path(), false);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            LeanTls::accept(s, server).await
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // The first bytes of a TLS record header (handshake, TLS 1.0 legacy version), then EOF.
        tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        drop(tcp);
        let err = accept
            .await
            .unwrap()
            .err()
            .expect("a handshake cut short is an error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
