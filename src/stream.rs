//! Sockets that may or may not be wrapped in TLS, for both sides of the proxy, and the TLS
//! configurations that wrap them.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connection to a client or a server: plain TCP, TLS on either side, or a Unix-domain socket
/// to a PostgreSQL on the same host.
pub enum Stream {
    Plain(TcpStream),
    /// pgswitch is the client of a local PostgreSQL's socket (never TLS, as with libpq).
    Local(UnixStream),
    /// pgswitch is the TLS server (client-facing).
    Accepted(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// pgswitch is the TLS client (towards PostgreSQL).
    Connected(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Accepted(_) | Stream::Connected(_))
    }

    /// A non-blocking read straight from a raw socket; `None` for TLS streams.
    pub fn try_read_raw(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        match self {
            Stream::Plain(s) => Some(s.try_read(buf)),
            Stream::Local(s) => Some(s.try_read(buf)),
            _ => None,
        }
    }

    /// Ready when a read would not block. For TLS streams rustls may hold buffered plaintext,
    /// so they always report ready and the caller reads.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Local(s) => s.poll_read_ready(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The non-blocking calls of a raw socket (TCP or Unix-domain) that the relay's reads and
/// writes are made of.
trait RawSocket {
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

macro_rules! raw_socket {
    ($t:ty) => {
        impl RawSocket for $t {
            #[inline]
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
            #[inline]
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            #[inline]
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            #[inline]
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
        }
    };
}
raw_socket!(TcpStream);
raw_socket!(UnixStream);

/// One read of a raw socket into `room` bytes of space, through tokio's readiness but not its
/// task budget (the relay keeps its own): `Ok(None)` without a system call while the socket is
/// known to be empty. A read that leaves room over emptied the socket, and clears its readiness
/// then, as tokio's own reads do, so the next read waits for the next event instead of asking
/// the kernel in vain.
#[inline]
fn recv<S: RawSocket>(
    sock: &S,
    room: usize,
    read: impl FnOnce(&S) -> io::Result<usize>,
) -> io::Result<Option<usize>> {
    let mut got = 0;
    let outcome = sock.try_io(Interest::READABLE, || {
        got = read(sock)?;
        if got > 0 && got < room {
            // Emptied: `try_io` clears the readiness this read was made with.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match outcome {
        Ok(()) => Ok(Some(got)),
        // Bytes were read: the error is the one above.
        Err(_) if got > 0 => Ok(Some(got)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// `recv` until something was read, the socket is at its end, or it has nothing (the task's
/// waker registered for it).
#[inline]
fn poll_recv<S: RawSocket>(
    sock: &S,
    cx: &mut Context<'_>,
    room: usize,
    mut read: impl FnMut(&S) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        match recv(sock, room, &mut read)? {
            Some(n) => return Poll::Ready(Ok(n)),
            None => ready!(sock.poll_read_ready(cx))?,
        }
    }
}

/// One write of as much of `data` as the socket takes, like `recv`: a partial write found the
/// send buffer full and clears the writability it was made with.
#[inline]
fn poll_send<S: RawSocket>(sock: &S, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        let mut sent = 0;
        let outcome = sock.try_io(Interest::WRITABLE, || {
            sent = sock.try_write(data)?;
            if sent < data.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match outcome {
            Ok(()) => return Poll::Ready(Ok(sent)),
            // Bytes were written: the error is the one above.
            Err(_) if sent > 0 => return Poll::Ready(Ok(sent)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(sock.poll_write_ready(cx))?,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// The relay's reads and writes. On raw sockets they go through tokio's readiness without its
/// per-operation task budget and without the `AsyncRead` adapters; TLS streams go through
/// `AsyncRead`/`AsyncWrite`.
impl Stream {
    /// Reads into the spare capacity of `buf` (which the caller reserved): the bytes read, 0 at
    /// the end of the stream.
    #[inline]
    pub fn poll_recv_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let room = buf.capacity() - buf.len();
        match self {
            Stream::Plain(s) => poll_recv(s, cx, room, |s| s.try_read_buf(buf)),
            Stream::Local(s) => poll_recv(s, cx, room, |s| s.try_read_buf(buf)),
            tls => tokio_util::io::poll_read_buf(Pin::new(tls), cx, buf),
        }
    }

    /// Whether a read may find something now: for a raw socket, tokio saw it readable and no
    /// read emptied it since (no system call); TLS streams always may (rustls may hold
    /// plaintext).
    #[inline]
    pub fn read_ready_now(&self) -> bool {
        match self {
            Stream::Plain(s) => s.try_io(Interest::READABLE, || Ok(())).is_ok(),
            Stream::Local(s) => s.try_io(Interest::READABLE, || Ok(())).is_ok(),
            _ => true,
        }
    }

    /// Writes from the start of `buf` as much as the socket takes now, and advances `buf` past
    /// it: the bytes written.
    #[inline]
    pub fn poll_send_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(match self {
            Stream::Plain(s) => poll_send(s, cx, buf),
            Stream::Local(s) => poll_send(s, cx, buf),
            tls => Pin::new(tls).poll_write(cx, buf),
        })?;
        buf.advance(n);
        Poll::Ready(Ok(n))
    }
}

impl Stream {
    /// Best effort, without waiting: hands `bytes` (a client's last message) to the kernel as the
    /// stream is about to be closed outside any task (TLS: with its close_notify). Whatever does
    /// not fit in the socket's send buffer right now is dropped.
    pub fn send_last(&mut self, bytes: &[u8]) {
        use std::io::Write as _;
        match self {
            Stream::Plain(s) => {
                let _ = socket2::SockRef::from(&*s).send(bytes);
            }
            Stream::Local(s) => {
                let _ = socket2::SockRef::from(&*s).send(bytes);
            }
            Stream::Accepted(s) => {
                let (tcp, tls) = s.get_mut();
                if tls.writer().write_all(bytes).is_err() {
                    return;
                }
                tls.send_close_notify();
                let sock = socket2::SockRef::from(&*tcp);
                let mut out: &socket2::Socket = &sock;
                while tls.wants_write() {
                    if !matches!(tls.write_tls(&mut out), Ok(n) if n > 0) {
                        break;
                    }
                }
            }
            Stream::Connected(_) => {}
        }
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Plain(s) => s.as_fd(),
            Stream::Local(s) => s.as_fd(),
            Stream::Accepted(s) => s.get_ref().0.as_fd(),
            Stream::Connected(s) => s.get_ref().0.as_fd(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Local(s) => Pin::new(s).poll_flush(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Local(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Keepalive and `TCP_USER_TIMEOUT` on server sockets, so a hung or vanished PostgreSQL host is
/// noticed by the kernel within seconds instead of the two-hour default.
pub fn tune_server_socket(tcp: &TcpStream, user_timeout: Duration) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(user_timeout));
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {message}")]
    Cert { path: String, message: String },
    #[error("cannot read private key {path}: {message}")]
    Key { path: String, message: String },
    #[error("invalid certificate/key pair: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client-facing TLS acceptor from `[tls] cert/key` (PEM files).
pub fn server_tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// TLS towards PostgreSQL as libpq's `sslmode=require`: encrypted, certificate not verified.
pub fn server_side_connector() -> Result<tokio_rustls::TlsConnector, TlsError> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsError::Config(format!("invalid server name {host}: {e}")))
}

/// Accepts any server certificate (sslmode=require semantics) but still checks signatures so the
/// handshake itself is sound.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn tcp_pair() -> (Stream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Stream::Plain(ours.unwrap()), theirs.unwrap().0)
    }

    fn unix_pair() -> (Stream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (Stream::Local(ours), theirs)
    }

    fn poll_once<T>(f: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        f(&mut Context::from_waker(Waker::noop()))
    }

    /// Reads what arrived; the read emptied the socket, so its readiness is cleared (the next
    /// read is `Pending` without a system call, and registers the waker); reads what arrives
    /// next, and 0 at the end.
    async fn reads_each_arrival_then_waits(mut ours: Stream, mut theirs: impl AsyncWrite + Unpin) {
        let mut buf = BytesMut::with_capacity(1024);
        theirs.write_all(b"hello").await.unwrap();
        let n = poll_fn(|cx| ours.poll_recv_buf(cx, &mut buf))
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (5, &b"hello"[..]));
        assert!(
            !ours.read_ready_now(),
            "a read that left room over cleared the readiness"
        );
        assert!(poll_once(|cx| ours.poll_recv_buf(cx, &mut buf)).is_pending());
        theirs.write_all(b" world").await.unwrap();
        let n = poll_fn(|cx| ours.poll_recv_buf(cx, &mut buf))
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (6, &b"hello world"[..]));
        drop(theirs);
        let n = poll_fn(|cx| ours.poll_recv_buf(cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(n, 0, "the end of the stream");
    }

    /// Writes until the socket is full (`Pending` after a partial write), then the rest once
    /// the peer reads: every byte arrives, in order.
    async fn writes_until_full_then_the_rest(
        mut ours: Stream,
        mut theirs: impl AsyncRead + Unpin + Send + 'static,
    ) {
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut out = BytesMut::from(&data[..]);
        while poll_once(|cx| ours.poll_send_buf(cx, &mut out)).is_ready() {}
        assert!(
            !out.is_empty() && out.len() < data.len(),
            "some was written, not all"
        );
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            got
        });
        while !out.is_empty() {
            poll_fn(|cx| ours.poll_send_buf(cx, &mut out))
                .await
                .unwrap();
        }
        drop(ours);
        assert!(reader.await.unwrap() == data, "every byte, in order");
    }

    #[tokio::test]
    async fn tcp_reads_each_arrival_then_waits() {
        let (ours, theirs) = tcp_pair().await;
        reads_each_arrival_then_waits(ours, theirs).await;
    }

    #[tokio::test]
    async fn unix_reads_each_arrival_then_waits() {
        let (ours, theirs) = unix_pair();
        reads_each_arrival_then_waits(ours, theirs).await;
    }

    #[tokio::test]
    async fn tcp_writes_until_full_then_the_rest() {
        let (ours, theirs) = tcp_pair().await;
        writes_until_full_then_the_rest(ours, theirs).await;
    }

    #[tokio::test]
    async fn unix_writes_until_full_then_the_rest() {
        let (ours, theirs) = unix_pair();
        writes_until_full_then_the_rest(ours, theirs).await;
    }
}
