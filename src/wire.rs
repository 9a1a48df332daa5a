//! The PostgreSQL wire protocol, sans IO: framing, startup packets and the few messages the
//! proxy writes itself. Everything here works on byte slices and `BytesMut`; nothing touches a
//! socket, so every parser is unit- and property-tested without a network.

use bytes::{BufMut, BytesMut};

/// Protocol 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// What a client may send before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: u32, secret: u32 },
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// Parameters in the order the client sent them, `_pq_.` protocol options excluded.
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options the client asked for; pgswitch supports none of them.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid length of startup packet")]
    BadStartupLength,
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0")]
    UnsupportedProtocol(u16, u16),
    #[error("invalid startup packet layout: {0}")]
    BadStartup(&'static str),
    #[error("invalid message length {0}")]
    BadLength(u32),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("invalid {0} message")]
    BadMessage(&'static str),
}

/// Parses one startup-phase packet from the front of `buf`.
/// Returns `Ok(None)` while the packet is incomplete, or the packet and its length.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = read_u32(buf, 0) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(WireError::BadStartupLength);
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[4..len];
    let code = read_u32(body, 0);
    let packet = match code {
        SSL_REQUEST_CODE if len == 8 => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE if len == 8 => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE if len == 16 => StartupPacket::Cancel {
            pid: read_u32(body, 4),
            secret: read_u32(body, 8),
        },
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            return Err(WireError::BadStartupLength)
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(WireError::UnsupportedProtocol(major, minor));
            }
            StartupPacket::Startup(parse_startup_params(major, minor, &body[4..])?)
        }
    };
    Ok(Some((packet, len)))
}

fn parse_startup_params(
    major: u16,
    minor: u16,
    mut rest: &[u8],
) -> Result<StartupMessage, WireError> {
    let mut params = Vec::new();
    let mut protocol_options = Vec::new();
    loop {
        let (key, after) = startup_cstr(rest, "missing terminator")?;
        if key.is_empty() {
            if !after.is_empty() {
                return Err(WireError::BadStartup("bytes after the final terminator"));
            }
            break;
        }
        let (value, after) = startup_cstr(after, "parameter without a value")?;
        if let Some(option) = key.strip_prefix("_pq_.") {
            protocol_options.push(format!("_pq_.{option}"));
        } else {
            params.push((key.to_string(), value.to_string()));
        }
        rest = after;
    }
    Ok(StartupMessage {
        major,
        minor,
        params,
        protocol_options,
    })
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

/// A startup packet's NUL-terminated string: `missing` names what is wrong when there is no NUL.
fn startup_cstr<'a>(
    buf: &'a [u8],
    missing: &'static str,
) -> Result<(&'a str, &'a [u8]), WireError> {
    let (s, rest) = split_cstr(buf).ok_or(WireError::BadStartup(missing))?;
    let s = std::str::from_utf8(s)
        .map_err(|_| WireError::BadStartup("startup parameter is not valid UTF-8"))?;
    Ok((s, rest))
}

/// Splits a NUL-terminated UTF-8 string off the front of `buf`.
fn read_cstr(buf: &[u8]) -> Option<(&str, &[u8])> {
    let (s, rest) = split_cstr(buf)?;
    Some((std::str::from_utf8(s).ok()?, rest))
}

/// Splits the bytes before the first NUL off the front of `buf` (the NUL is dropped).
fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// One step of walking a byte stream message by message, knowing only type and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A message header was completed; its body of `body_len` bytes follows.
    /// `at` is the offset of the type byte in the current chunk, when the header began in it.
    Header {
        tag: u8,
        body_len: usize,
        at: Option<usize>,
    },
    /// The message with this tag ends at `end` (exclusive) in the current chunk.
    End { tag: u8, end: usize },
}

/// Walks a stream of type+length framed messages across arbitrary chunk boundaries, without
/// copying or buffering bodies: a 100 MB row streams through with five bytes of state.
#[derive(Debug, Default, Clone)]
pub struct Scanner {
    header: [u8; 5],
    header_len: usize,
    tag: u8,
    remaining: usize,
    in_body: bool,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// True when the stream is exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        !self.in_body && self.header_len == 0
    }

    /// Advances through `chunk` from `*pos`. Returns the next event, or `None` once the chunk is
    /// used up. Bodies longer than `max_body` are refused.
    pub fn step(
        &mut self,
        chunk: &[u8],
        pos: &mut usize,
        max_body: usize,
    ) -> Result<Option<Step>, WireError> {
        if self.in_body {
            let n = self.remaining.min(chunk.len() - *pos);
            *pos += n;
            self.remaining -= n;
            if self.remaining == 0 {
                self.in_body = false;
                return Ok(Some(Step::End {
                    tag: self.tag,
                    end: *pos,
                }));
            }
            return Ok(None);
        }
        let start = *pos;
        let fresh = self.header_len == 0;
        while self.header_len < 5 && *pos < chunk.len() {
            self.header[self.header_len] = chunk[*pos];
            self.header_len += 1;
            *pos += 1;
        }
        if self.header_len < 5 {
            return Ok(None);
        }
        let began_here = fresh;
        self.header_len = 0;
        self.tag = self.header[0];
        let len = read_u32(&self.header, 1);
        if len < 4 {
            return Err(WireError::BadLength(len));
        }
        let body_len = (len - 4) as usize;
        if body_len > max_body {
            return Err(WireError::TooLong {
                len: body_len,
                max: max_body,
            });
        }
        self.remaining = body_len;
        self.in_body = true;
        Ok(Some(Step::Header {
            tag: self.tag,
            body_len,
            at: began_here.then_some(start),
        }))
    }
}

/// Splits complete messages off the front of `buf`: `(tag, body)` with the body bytes split out
/// as their own buffer. For control paths (startup, auth) where messages are small.
pub fn take_message(
    buf: &mut BytesMut,
    max_body: usize,
) -> Result<Option<(u8, BytesMut)>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = read_u32(buf, 1);
    if len < 4 {
        return Err(WireError::BadLength(len));
    }
    let body_len = (len - 4) as usize;
    if body_len > max_body {
        return Err(WireError::TooLong {
            len: body_len,
            max: max_body,
        });
    }
    if buf.len() < 5 + body_len {
        buf.reserve(5 + body_len - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    let mut msg = buf.split_to(5 + body_len);
    let body = msg.split_off(5);
    Ok(Some((tag, body)))
}

/// A client's answer during authentication ('p' messages).
#[derive(Debug, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    pub mechanism: &'a str,
    pub data: &'a [u8],
}

pub fn parse_sasl_initial_response(body: &[u8]) -> Result<SaslInitialResponse<'_>, WireError> {
    let bad = WireError::BadMessage("SASLInitialResponse");
    let (mechanism, rest) = read_cstr(body).ok_or(bad.clone())?;
    if rest.len() < 4 {
        return Err(bad);
    }
    let len = read_u32(rest, 0) as i32;
    let data = &rest[4..];
    if len == -1 {
        return Ok(SaslInitialResponse {
            mechanism,
            data: &[],
        });
    }
    if len < 0 || len as usize != data.len() {
        return Err(bad);
    }
    Ok(SaslInitialResponse { mechanism, data })
}

/// A PasswordMessage body without its NUL terminator.
pub fn parse_password_message(body: &[u8]) -> Result<&[u8], WireError> {
    match body.split_last() {
        Some((0, rest)) if !rest.contains(&0) => Ok(rest),
        _ => Err(WireError::BadMessage("PasswordMessage")),
    }
}

/// Writes a backend message with a tag and a body built by `f`.
fn backend_message(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let len_at = buf.len();
    buf.put_u32(0);
    f(buf);
    let len = (buf.len() - len_at) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

pub fn authentication_ok(buf: &mut BytesMut) {
    backend_message(buf, b'R', |b| b.put_u32(0));
}

pub fn authentication_cleartext(buf: &mut BytesMut) {
    backend_message(buf, b'R', |b| b.put_u32(3));
}

pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    backend_message(buf, b'R', |b| {
        b.put_u32(5);
        b.put_slice(&salt);
    });
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    backend_message(buf, b'R', |b| {
        b.put_u32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    backend_message(buf, b'R', |b| {
        b.put_u32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    backend_message(buf, b'R', |b| {
        b.put_u32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    backend_message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: u32, secret: u32) {
    backend_message(buf, b'K', |b| {
        b.put_u32(pid);
        b.put_u32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    backend_message(buf, b'Z', |b| b.put_u8(status));
}

/// NegotiateProtocolVersion: pgswitch speaks 3.0 and none of the `_pq_.` options.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: u32, unsupported: &[String]) {
    backend_message(buf, b'v', |b| {
        b.put_u32(PROTOCOL_3_0 | newest_minor);
        b.put_u32(unsupported.len() as u32);
        for o in unsupported {
            put_cstr(b, o);
        }
    });
}

/// Severity of an error or notice the proxy sends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// ErrorResponse with severity, SQLSTATE and message, as PostgreSQL writes them.
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    backend_message(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// The 16-byte CancelRequest packet sent to a PostgreSQL server.
pub fn cancel_request(pid: u32, secret: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16u32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&secret.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn startup_bytes(params: &[(&str, &str)], version: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&version.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn startup_message_params_are_parsed() {
        let bytes = startup_bytes(&[("user", "app"), ("database", "db")], PROTOCOL_3_0);
        let (packet, used) = parse_startup(&bytes).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        match packet {
            StartupPacket::Startup(m) => {
                assert_eq!(m.param("user"), Some("app"));
                assert_eq!(m.param("database"), Some("db"));
                assert_eq!(m.minor, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn protocol_3_2_and_pq_options_are_separated() {
        let bytes = startup_bytes(&[("user", "a"), ("_pq_.foo", "1")], PROTOCOL_3_0 | 2);
        let (packet, _) = parse_startup(&bytes).expect("valid").expect("complete");
        let StartupPacket::Startup(m) = packet else {
            panic!("not a startup message")
        };
        assert_eq!(m.minor, 2);
        assert_eq!(m.protocol_options, vec!["_pq_.foo".to_string()]);
        assert_eq!(m.params.len(), 1);
    }

    #[test]
    fn ssl_and_cancel_requests_are_recognised() {
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend(SSL_REQUEST_CODE.to_be_bytes());
        assert_eq!(
            parse_startup(&ssl).expect("ok"),
            Some((StartupPacket::SslRequest, 8))
        );
        let cancel = cancel_request(7, 9);
        assert_eq!(
            parse_startup(&cancel).expect("ok"),
            Some((StartupPacket::Cancel { pid: 7, secret: 9 }, 16))
        );
    }

    #[test]
    fn bad_startup_lengths_and_versions_are_errors() {
        assert_eq!(
            parse_startup(&[0, 0, 0, 2, 0, 0, 0, 0]),
            Err(WireError::BadStartupLength)
        );
        assert_eq!(
            parse_startup(&[0x7f, 0, 0, 0]),
            Err(WireError::BadStartupLength)
        );
        let v2 = startup_bytes(&[("user", "a")], 2 << 16);
        assert_eq!(
            parse_startup(&v2),
            Err(WireError::UnsupportedProtocol(2, 0))
        );
    }

    #[test]
    fn a_startup_parameter_that_is_not_utf8_is_named_as_such() {
        let mut bytes = startup_bytes(&[("user", "app"), ("application_name", "x")], PROTOCOL_3_0);
        let at = bytes.len() - 3; // the value "x"
        bytes[at] = 0xff;
        assert_eq!(
            parse_startup(&bytes),
            Err(WireError::BadStartup(
                "startup parameter is not valid UTF-8"
            ))
        );
        let mut no_value = 9u32.to_be_bytes().to_vec();
        no_value.extend(PROTOCOL_3_0.to_be_bytes());
        no_value.push(b'u');
        assert_eq!(
            parse_startup(&no_value),
            Err(WireError::BadStartup("missing terminator"))
        );
    }

    #[test]
    fn incomplete_startup_waits_for_more() {
        let bytes = startup_bytes(&[("user", "app")], PROTOCOL_3_0);
        assert_eq!(parse_startup(&bytes[..bytes.len() - 1]), Ok(None));
        assert_eq!(parse_startup(&bytes[..3]), Ok(None));
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend(((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Feeds `stream` to a scanner in chunks of `size` and collects (tag, body_len) of every
    /// completed message plus the status byte of every ReadyForQuery.
    fn scan_all(stream: &[u8], size: usize) -> Result<Vec<(u8, usize, Option<u8>)>, WireError> {
        let mut scanner = Scanner::new();
        let mut out = Vec::new();
        let mut lens = Vec::new();
        for chunk in stream.chunks(size.max(1)) {
            let mut pos = 0;
            while let Some(step) = scanner.step(chunk, &mut pos, 1 << 20)? {
                match step {
                    Step::Header { body_len, .. } => lens.push(body_len),
                    Step::End { tag, end } => {
                        let status = (tag == b'Z').then(|| chunk[end - 1]);
                        out.push((tag, lens.remove(0), status));
                    }
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn scanner_follows_messages_across_any_chunking() {
        let mut stream = msg(b'T', b"abc");
        stream.extend(msg(b'C', b""));
        stream.extend(msg(b'Z', b"I"));
        stream.extend(msg(b'D', &[7u8; 300]));
        stream.extend(msg(b'Z', b"T"));
        for size in [1, 2, 3, 5, 7, 64, 4096] {
            let got = scan_all(&stream, size).expect("valid stream");
            assert_eq!(
                got,
                vec![
                    (b'T', 3, None),
                    (b'C', 0, None),
                    (b'Z', 1, Some(b'I')),
                    (b'D', 300, None),
                    (b'Z', 1, Some(b'T')),
                ],
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn scanner_reports_header_offsets_within_a_chunk() {
        let mut stream = msg(b'Q', b"select 1\0");
        stream.extend(msg(b'X', b""));
        let mut scanner = Scanner::new();
        let mut pos = 0;
        let mut headers = Vec::new();
        while let Some(step) = scanner.step(&stream, &mut pos, 1024).expect("valid") {
            if let Step::Header { tag, at, .. } = step {
                headers.push((tag, at));
            }
        }
        assert_eq!(headers, vec![(b'Q', Some(0)), (b'X', Some(14))]);
        assert!(scanner.at_boundary());
    }

    #[test]
    fn scanner_refuses_oversized_and_short_lengths() {
        let mut scanner = Scanner::new();
        let mut pos = 0;
        let big = [b'Q', 0x7f, 0, 0, 0];
        assert!(matches!(
            scanner.step(&big, &mut pos, 1024),
            Err(WireError::TooLong { .. })
        ));
        let mut scanner = Scanner::new();
        let mut pos = 0;
        assert_eq!(
            scanner.step(&[b'Q', 0, 0, 0, 3], &mut pos, 1024),
            Err(WireError::BadLength(3))
        );
    }

    #[test]
    fn take_message_splits_complete_messages() {
        let mut buf = BytesMut::from(&msg(b'p', b"pw\0")[..]);
        buf.extend_from_slice(&[b'Q', 0]);
        let (tag, body) = take_message(&mut buf, 1024).expect("ok").expect("complete");
        assert_eq!(tag, b'p');
        assert_eq!(&body[..], b"pw\0");
        assert_eq!(take_message(&mut buf, 1024), Ok(None));
    }

    #[test]
    fn sasl_initial_response_is_parsed() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend(4u32.to_be_bytes());
        body.extend(b"abcd");
        let r = parse_sasl_initial_response(&body).expect("valid");
        assert_eq!(r.mechanism, "SCRAM-SHA-256");
        assert_eq!(r.data, b"abcd");
        body.pop();
        assert!(parse_sasl_initial_response(&body).is_err());
    }

    #[test]
    fn error_response_carries_sqlstate() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, "28P01", "nope");
        assert_eq!(buf[0], b'E');
        let text = String::from_utf8_lossy(&buf[5..]).to_string();
        assert!(text.contains("C28P01\0"));
        assert!(text.contains("Mnope\0"));
    }

    proptest! {
        #[test]
        fn parse_startup_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_startup(&bytes);
        }

        #[test]
        fn truncated_startup_is_never_complete(
            params in proptest::collection::vec(("[a-z]{1,8}", "[ -~]{0,12}"), 0..5),
            cut in 0usize..100,
        ) {
            let refs: Vec<(&str, &str)> = params.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let bytes = startup_bytes(&refs, PROTOCOL_3_0);
            let cut = cut.min(bytes.len().saturating_sub(1));
            prop_assert!(matches!(parse_startup(&bytes[..cut]), Ok(None) | Err(_)));
            prop_assert!(matches!(parse_startup(&bytes), Ok(Some(_)) | Err(_)));
        }

        #[test]
        fn scanner_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), size in 1usize..40) {
            let mut scanner = Scanner::new();
            'outer: for chunk in bytes.chunks(size) {
                let mut pos = 0;
                loop {
                    match scanner.step(chunk, &mut pos, 4096) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
        }

        #[test]
        fn take_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = take_message(&mut buf, 4096) {}
        }

        #[test]
        fn auth_message_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = parse_sasl_initial_response(&bytes);
            let _ = parse_password_message(&bytes);
        }
    }
}
