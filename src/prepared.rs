//! Protocol-level prepared statements in transaction pooling mode.
//!
//! A client's named statements live in pgswitch, not on one server: each is prepared on
//! whichever server the client gets, under a name derived from the query text and parameter
//! types (`pgsw_<hash>`), so identical statements of different clients share one server-side
//! statement. Client messages that name statements are rewritten; a Parse the server already
//! has is answered by pgswitch itself; a Bind or Describe of a statement the server lacks is
//! preceded by a Parse whose answer is swallowed. Responses are matched to requests in order,
//! which is what lets synthetic answers land exactly where the client expects them.
//!
//! Everything here is sans IO: bytes in, bytes out.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

/// A statement as a client prepared it.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// The name it has on servers: the same for every client preparing the same query.
    pub server_name: String,
    /// The complete Parse message that creates it under `server_name`.
    pub parse: Bytes,
}

/// Statements that PostgreSQL accepted on some server connection of a pool. A client that
/// prepares one of them between transactions is answered by pgswitch without a server: a
/// driver that prepares synchronously (pgbench -M prepared, JDBC) then never waits for a
/// server just to learn that a statement it will run later parses.
#[derive(Debug, Default)]
pub struct KnownStatements {
    names: std::sync::Mutex<std::collections::HashSet<String, Fast>>,
}

/// Statement names are hashed on every Bind and Describe: foldhash (randomly seeded) instead
/// of SipHash.
type Fast = foldhash::fast::RandomState;

/// Bound on `KnownStatements`; past it the set starts over (it is only a shortcut).
const MAX_KNOWN: usize = 10_000;

impl KnownStatements {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String, Fast>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains(name)
    }

    pub fn insert(&self, name: String) {
        let mut names = self.lock();
        if names.len() >= MAX_KNOWN {
            names.clear();
        }
        names.insert(name);
    }
}

/// One client's named statements. The map is made on the first one: a client that never
/// names a statement keeps a pointer, not an empty map.
#[derive(Debug, Default)]
pub struct ClientStatements {
    #[allow(clippy::box_collection)]
    by_name: Option<Box<HashMap<String, Arc<Statement>, Fast>>>,
}

impl ClientStatements {
    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        self.by_name.as_ref()?.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.by_name = None;
    }

    fn insert(&mut self, name: String, statement: Statement) {
        self.by_name
            .get_or_insert_with(Default::default)
            .insert(name, Arc::new(statement));
    }

    fn remove(&mut self, name: &str) {
        if let Some(m) = &mut self.by_name {
            m.remove(name);
        }
    }

    /// Between transactions: a Parse of a statement the pool already knows to be valid is
    /// recorded and answered locally (true); anything else needs a server (false).
    pub fn parse_locally(&mut self, msg: &[u8], known: &KnownStatements) -> bool {
        if is_unnamed_parse(msg) {
            return false;
        }
        let Some(p) = msg.get(5..).and_then(parse_parse) else {
            return false;
        };
        let Ok(name) = std::str::from_utf8(p.name) else {
            return false;
        };
        let server_name = server_name(p.query, p.param_types);
        if !known.contains(&server_name) {
            return false;
        }
        let parse = message(
            b'P',
            &[server_name.as_bytes(), b"\0", p.query, b"\0", p.param_types],
        );
        self.insert(name.to_string(), Statement { server_name, parse });
        true
    }

    /// Between transactions: Close of a named statement only forgets the name.
    pub fn close_locally(&mut self, msg: &[u8]) -> bool {
        match msg.get(5..) {
            Some([b'S', rest @ ..]) => match cstr(rest) {
                Some((name, _)) if !name.is_empty() => {
                    if let Ok(name) = std::str::from_utf8(name) {
                        self.remove(name);
                    }
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// The pgswitch-named statements that exist on one server connection, least recently used
/// first, bounded.
#[derive(Debug, Default)]
pub struct ServerStatements {
    names: HashMap<String, u64, Fast>,
    tick: u64,
}

impl ServerStatements {
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Marks `name` as just used; false if the server does not have it.
    pub fn touch(&mut self, name: &str) -> bool {
        match self.names.get_mut(name) {
            Some(t) => {
                self.tick += 1;
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, name: String) {
        self.tick += 1;
        self.names.insert(name, self.tick);
    }

    pub fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The least recently used statement, if more than `capacity` are prepared.
    pub fn over_capacity(&self, capacity: usize) -> Option<String> {
        if self.names.len() <= capacity {
            return None;
        }
        self.names
            .iter()
            .min_by_key(|(_, t)| **t)
            .map(|(n, _)| n.clone())
    }
}

/// What pgswitch expects from the server, in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// A client request that was forwarded; its answer goes to the client.
    Reply {
        request: u8,
        parse_of: Option<String>,
    },
    /// An answer pgswitch writes itself once everything before it was answered.
    Inject(u8),
    /// A request pgswitch added; its answer (this tag) is dropped.
    Swallow {
        answer: u8,
        parse_of: Option<String>,
    },
}

/// Tags whose arrival completes the answer to a request.
fn completes(request: u8, answer: u8) -> bool {
    match request {
        b'P' => answer == b'1',
        b'B' => answer == b'2',
        b'C' => answer == b'3',
        b'D' => matches!(answer, b'T' | b'n'),
        b'E' => matches!(answer, b'C' | b'I' | b's'),
        b'S' | b'Q' | b'F' => answer == b'Z',
        _ => false,
    }
}

/// Requests whose answers are tracked; Flush and COPY data have none.
pub fn is_tracked_request(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'C' | b'D' | b'E' | b'S' | b'Q' | b'F')
}

/// Matches server answers to requests and says what to inject or drop.
#[derive(Debug, Default)]
pub struct Tracker {
    queue: VecDeque<Pending>,
    /// Statements the server just accepted, for the pool's `KnownStatements`.
    pub confirmed: Vec<String>,
}

/// What to do with a message from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Drop,
}

impl Tracker {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn push(&mut self, p: Pending) {
        self.queue.push_back(p);
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// Nothing expected and nothing to report: the tracker can change hands.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.confirmed.is_empty()
    }

    /// An answer pgswitch writes itself is due now.
    pub fn has_injects(&self) -> bool {
        matches!(self.queue.front(), Some(Pending::Inject(_)))
    }

    /// Writes answers that are due now (nothing before them is outstanding) into `out`.
    pub fn drain_injects(&mut self, out: &mut BytesMut) {
        while let Some(Pending::Inject(tag)) = self.queue.front() {
            out.put_u8(*tag);
            out.put_u32(4);
            self.queue.pop_front();
        }
    }

    /// Decides about a server message by its tag, before it is forwarded (a swallowed answer
    /// never reaches the client). Statements that turn out not to exist on the server after an
    /// error are removed from `server`.
    /// The caller forwards (or drops) the message, then calls `drain_injects` once it ended.
    #[inline(always)]
    pub fn on_server_message(&mut self, tag: u8, server: &mut ServerStatements) -> Verdict {
        match self.queue.front() {
            Some(Pending::Swallow { answer, .. }) if *answer == tag => {
                if let Some(Pending::Swallow {
                    parse_of: Some(name),
                    ..
                }) = self.queue.pop_front()
                {
                    self.confirmed.push(name);
                }
                Verdict::Drop
            }
            Some(Pending::Reply { request, .. }) if completes(*request, tag) => {
                if let Some(Pending::Reply {
                    parse_of: Some(name),
                    ..
                }) = self.queue.pop_front()
                {
                    self.confirmed.push(name);
                }
                Verdict::Forward
            }
            Some(Pending::Reply { request, .. })
                if tag == b'E' && matches!(request, b'Q' | b'F') =>
            {
                // A simple query's error is followed by its ReadyForQuery.
                Verdict::Forward
            }
            Some(_) if tag == b'E' => {
                self.abandon_until_sync(server);
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    /// After an error in an extended-protocol batch the server skips everything up to Sync:
    /// those requests will never be answered, and statements they would have created do not
    /// exist.
    fn abandon_until_sync(&mut self, server: &mut ServerStatements) {
        while let Some(front) = self.queue.front() {
            if matches!(front, Pending::Reply { request: b'S', .. }) {
                break;
            }
            match self.queue.pop_front() {
                Some(Pending::Reply {
                    parse_of: Some(name),
                    ..
                })
                | Some(Pending::Swallow {
                    parse_of: Some(name),
                    ..
                }) => server.remove(&name),
                _ => {}
            }
        }
    }
}

/// The server-side name for a statement: identical text and parameter types share it.
pub fn server_name(query: &[u8], param_types: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut h);
    param_types.hash(&mut h);
    format!("pgsw_{:016x}_{}", h.finish(), query.len())
}

/// Splits a NUL-terminated string off the front of `buf`.
fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

fn message(tag: u8, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(5 + len);
    put_message(&mut out, tag, parts);
    out.freeze()
}

/// Appends a message made of `parts` to `out`.
fn put_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(5 + len);
    out.put_u8(tag);
    out.put_u32((4 + len) as u32);
    for p in parts {
        out.put_slice(p);
    }
}

/// A parsed Parse message body: statement name, and the rest (query + parameter types).
pub struct ParseBody<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: &'a [u8],
}

/// The statement name and query text of a Parse message body. Statement names are short (or
/// empty) and found byte by byte; the query, often tens of bytes and more, with one vectorised
/// scan.
pub fn parse_name_and_query(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, rest) = cstr(body)?;
    let end = memchr::memchr(0, rest)?;
    Some((name, &rest[..end]))
}

pub fn parse_parse(body: &[u8]) -> Option<ParseBody<'_>> {
    let (name, rest) = cstr(body)?;
    let (query, param_types) = cstr(rest)?;
    Some(ParseBody {
        name,
        query,
        param_types,
    })
}

/// Rewrites one complete client message (`msg` = tag + length + body) that may name a
/// prepared statement: what goes to the server is appended to `to_server`, and what pgswitch
/// expects back is queued in `tracker`. Returns false, having written nothing, for a message
/// that needs no rewriting (the unnamed statement) or is malformed (forward it unchanged and
/// let PostgreSQL report the error).
pub fn rewrite_client_message(
    msg: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    capacity: usize,
    to_server: &mut BytesMut,
    tracker: &mut Tracker,
) -> bool {
    let mut out = Out { to_server, tracker };
    rewrite(msg, client, server, capacity, &mut out).is_some()
}

/// What [`rewrite_bind_start`] did with the start of a Bind.
#[derive(Debug, PartialEq, Eq)]
pub enum BindStart {
    /// The portal and statement names are not both here yet.
    Incomplete,
    /// The Bind goes to the server as it is (the unnamed statement, or a name the client never
    /// prepared, which the server then refuses).
    AsIs,
    /// Its first `n` bytes (header, portal and statement name) were replaced in `to_server`;
    /// the rest of the message follows unchanged.
    Rewritten(usize),
}

/// Rewrites the start of a Bind message that has not arrived whole (`start` holds its first
/// bytes, at most the whole message): the statement name sits before the parameter values,
/// so a Bind carrying megabytes of them streams through instead of being held until its end.
pub fn rewrite_bind_start(
    start: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    capacity: usize,
    to_server: &mut BytesMut,
    tracker: &mut Tracker,
) -> BindStart {
    let Some(names) = bind_names(start) else {
        return BindStart::Incomplete;
    };
    let mut out = Out { to_server, tracker };
    match bind_head(start, names, client, server, capacity, &mut out) {
        Some(n) => BindStart::Rewritten(n),
        None => BindStart::AsIs,
    }
}

/// The statement a Bind message (header included; its start is enough) binds, once its name
/// has arrived.
pub fn bind_statement(msg: &[u8]) -> Option<&[u8]> {
    bind_names(msg).map(|(_, stmt)| stmt)
}

/// The portal and statement names at the start of a Bind message (header included).
fn bind_names(msg: &[u8]) -> Option<(&[u8], &[u8])> {
    let (portal, rest) = cstr(msg.get(5..)?)?;
    let (stmt, _) = cstr(rest)?;
    Some((portal, stmt))
}

/// Writes the start of a Bind of a statement the client prepared: header (its length counting
/// the rest of the message, which the caller sends unchanged), portal, and the server-side
/// statement name, after preparing the statement on this server if needed. Returns how many
/// bytes of `msg` that start replaces; `None` (nothing written) for a Bind passed through.
/// `(portal, stmt)` are [`bind_names`] of `msg`.
fn bind_head(
    msg: &[u8],
    (portal, stmt): (&[u8], &[u8]),
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    capacity: usize,
    out: &mut Out<'_>,
) -> Option<usize> {
    if stmt.is_empty() {
        return None;
    }
    let len = u32::from_be_bytes(msg.get(1..5)?.try_into().ok()?) as usize;
    let replaced = 5 + portal.len() + 1 + stmt.len() + 1;
    let rest = (1 + len).checked_sub(replaced)?;
    let statement = client.get(std::str::from_utf8(stmt).ok()?)?;
    let name = statement.server_name.as_bytes();
    let new_len = u32::try_from(4 + portal.len() + 1 + name.len() + 1 + rest).ok()?;
    ensure_on_server(statement, server, capacity, out);
    out.to_server.reserve(replaced + name.len());
    out.to_server.put_u8(b'B');
    out.to_server.put_u32(new_len);
    for part in [portal, b"\0", name, b"\0"] {
        out.to_server.put_slice(part);
    }
    out.tracker.push(Pending::Reply {
        request: b'B',
        parse_of: None,
    });
    Some(replaced)
}

/// A Parse of the unnamed statement (its name, the first field, is empty): passed through as
/// it is, without looking at the query.
fn is_unnamed_parse(msg: &[u8]) -> bool {
    msg.get(5) == Some(&0)
}

/// Where a rewrite writes.
struct Out<'a> {
    to_server: &'a mut BytesMut,
    tracker: &'a mut Tracker,
}

fn rewrite(
    msg: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
    capacity: usize,
    out: &mut Out<'_>,
) -> Option<()> {
    let tag = *msg.first()?;
    let body = msg.get(5..)?;
    match tag {
        b'P' => {
            if is_unnamed_parse(msg) {
                return None;
            }
            let p = parse_parse(body)?;
            let name = std::str::from_utf8(p.name).ok()?.to_string();
            let server_name = server_name(p.query, p.param_types);
            let parse = message(
                b'P',
                &[server_name.as_bytes(), b"\0", p.query, b"\0", p.param_types],
            );
            if server.touch(&server_name) {
                out.tracker.push(Pending::Inject(b'1'));
            } else {
                evict(server, capacity, out);
                server.insert(server_name.clone());
                out.to_server.extend_from_slice(&parse);
                out.tracker.push(Pending::Reply {
                    request: b'P',
                    parse_of: Some(server_name.clone()),
                });
            }
            client.insert(name, Statement { server_name, parse });
        }
        b'B' => {
            let head = bind_head(msg, bind_names(msg)?, client, server, capacity, out)?;
            out.to_server.extend_from_slice(&msg[head..]);
        }
        b'D' => {
            let (&kind, rest) = body.split_first()?;
            let (name, _) = cstr(rest)?;
            if kind != b'S' || name.is_empty() {
                return None;
            }
            let statement = client.get(std::str::from_utf8(name).ok()?)?;
            ensure_on_server(statement, server, capacity, out);
            put_message(
                out.to_server,
                b'D',
                &[b"S", statement.server_name.as_bytes(), b"\0"],
            );
            out.tracker.push(Pending::Reply {
                request: b'D',
                parse_of: None,
            });
        }
        b'C' => {
            let (&kind, rest) = body.split_first()?;
            let (name, _) = cstr(rest)?;
            if kind != b'S' || name.is_empty() {
                return None;
            }
            // The server-side statement stays for other clients; the client's name goes.
            client.remove(std::str::from_utf8(name).ok()?);
            out.tracker.push(Pending::Inject(b'3'));
        }
        _ => return None,
    }
    Some(())
}

/// Prepares `statement` on the server first if it is not there, swallowing the answer.
fn ensure_on_server(
    statement: &Statement,
    server: &mut ServerStatements,
    capacity: usize,
    out: &mut Out<'_>,
) {
    if server.touch(&statement.server_name) {
        return;
    }
    evict(server, capacity, out);
    server.insert(statement.server_name.clone());
    out.to_server.extend_from_slice(&statement.parse);
    out.tracker.push(Pending::Swallow {
        answer: b'1',
        parse_of: Some(statement.server_name.clone()),
    });
}

/// Closes the least recently used server statement when the cache is full.
fn evict(server: &mut ServerStatements, capacity: usize, out: &mut Out<'_>) {
    if server.len() < capacity.max(1) {
        return;
    }
    if let Some(victim) = server.over_capacity(capacity.max(1) - 1) {
        server.remove(&victim);
        put_message(out.to_server, b'C', &[b"S", victim.as_bytes(), b"\0"]);
        out.tracker.push(Pending::Swallow {
            answer: b'3',
            parse_of: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one rewrite produced: the messages for the server, and the expectations queued.
    struct Rewritten {
        to_server: Vec<Bytes>,
        pending: Vec<Pending>,
    }

    fn rw(
        msg: &[u8],
        client: &mut ClientStatements,
        server: &mut ServerStatements,
        capacity: usize,
    ) -> Option<Rewritten> {
        let mut out = BytesMut::new();
        let mut tracker = Tracker::default();
        if !rewrite_client_message(msg, client, server, capacity, &mut out, &mut tracker) {
            assert!(
                out.is_empty() && tracker.is_empty(),
                "nothing written when not rewritten"
            );
            return None;
        }
        let mut to_server = Vec::new();
        while !out.is_empty() {
            let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
            to_server.push(out.split_to(1 + len).freeze());
        }
        Some(Rewritten {
            to_server,
            pending: tracker.queue.into_iter().collect(),
        })
    }

    fn msg(tag: u8, body: &[u8]) -> Bytes {
        message(tag, &[body])
    }

    fn parse_msg(name: &str, query: &str) -> Bytes {
        msg(b'P', format!("{name}\0{query}\0\0\0").as_bytes())
    }

    fn bind_msg(stmt: &str) -> Bytes {
        msg(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes())
    }

    #[test]
    fn identical_queries_share_a_server_name() {
        let a = server_name(b"select 1", b"\0\0");
        assert_eq!(a, server_name(b"select 1", b"\0\0"));
        assert_ne!(a, server_name(b"select 2", b"\0\0"));
    }

    #[test]
    fn parse_of_a_new_statement_is_forwarded_renamed() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let r = rw(&parse_msg("s1", "select 1"), &mut client, &mut server, 10).expect("rewritten");
        assert_eq!(r.to_server.len(), 1);
        let sent = &r.to_server[0];
        assert!(sent.windows(5).any(|w| w == b"pgsw_"));
        assert!(server.contains(&client.get("s1").expect("tracked").server_name));
    }

    #[test]
    fn parse_known_to_the_server_is_answered_by_pgswitch() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        rw(&parse_msg("s1", "select 1"), &mut client, &mut server, 10);
        let mut other = ClientStatements::default();
        let r = rw(&parse_msg("a", "select 1"), &mut other, &mut server, 10).expect("rewritten");
        assert!(r.to_server.is_empty());
        assert_eq!(r.pending, vec![Pending::Inject(b'1')]);
        let mut tracker = Tracker::default();
        for p in r.pending {
            tracker.push(p);
        }
        let mut out = BytesMut::new();
        tracker.drain_injects(&mut out);
        assert_eq!(&out[..], &[b'1', 0, 0, 0, 4]);
    }

    #[test]
    fn bind_on_a_server_without_the_statement_prepares_it_first() {
        let mut client = ClientStatements::default();
        let mut first = ServerStatements::default();
        rw(&parse_msg("s1", "select 1"), &mut client, &mut first, 10);
        let mut second = ServerStatements::default();
        let r = rw(&bind_msg("s1"), &mut client, &mut second, 10).expect("rewritten");
        assert_eq!(r.to_server.len(), 2);
        assert_eq!(r.to_server[0][0], b'P');
        assert_eq!(r.to_server[1][0], b'B');
        assert!(matches!(
            r.pending[0],
            Pending::Swallow { answer: b'1', .. }
        ));
        let mut tracker = Tracker::default();
        for p in r.pending {
            tracker.push(p);
        }
        assert_eq!(tracker.on_server_message(b'1', &mut second), Verdict::Drop);
        assert_eq!(
            tracker.on_server_message(b'2', &mut second),
            Verdict::Forward
        );
        assert!(tracker.is_empty());
    }

    #[test]
    fn the_start_of_a_big_bind_is_rewritten_like_the_whole_message() {
        let mut client = ClientStatements::default();
        let mut whole_server = ServerStatements::default();
        rw(
            &parse_msg("s1", "select $1"),
            &mut client,
            &mut whole_server,
            10,
        );
        // portal "p", statement "s1", no format codes, one 3000-byte parameter, no result codes
        let mut body = b"p\0s1\0\0\0\0\x01".to_vec();
        body.extend_from_slice(&3000u32.to_be_bytes());
        body.extend_from_slice(&[7; 3000]);
        body.extend_from_slice(&[0, 0]);
        let bind = msg(b'B', &body);
        let whole = rw(&bind, &mut client, &mut whole_server, 10).expect("rewritten");

        // The same Bind arriving in pieces, on another server without the statement.
        let mut server = ServerStatements::default();
        let mut out = BytesMut::new();
        let mut tracker = Tracker::default();
        for cut in [0, 4, 5, 7, 9] {
            assert_eq!(
                rewrite_bind_start(
                    &bind[..cut],
                    &mut client,
                    &mut server,
                    10,
                    &mut out,
                    &mut tracker
                ),
                BindStart::Incomplete,
                "{cut} bytes hold no statement name"
            );
        }
        let head = match rewrite_bind_start(
            &bind[..100],
            &mut client,
            &mut server,
            10,
            &mut out,
            &mut tracker,
        ) {
            BindStart::Rewritten(n) => n,
            other => panic!("not rewritten: {other:?}"),
        };
        assert_eq!(head, 5 + 2 + 3);
        out.extend_from_slice(&bind[head..]);
        let mut sent = Vec::new();
        while !out.is_empty() {
            let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
            sent.push(out.split_to(1 + len).freeze());
        }
        assert_eq!(sent.len(), 2, "the statement's Parse, then the Bind");
        assert_eq!(sent[0][0], b'P');
        assert_eq!(
            sent[1], whole.to_server[0],
            "the same Bind as rewritten whole"
        );
        assert!(matches!(
            tracker.queue.front(),
            Some(Pending::Swallow { answer: b'1', .. })
        ));

        // The unnamed statement and unknown names go through as they are.
        let mut unnamed = b"\0\0".to_vec();
        unnamed.extend_from_slice(&body[5..]);
        for start in [msg(b'B', &unnamed), bind_msg("nope")] {
            let before = out.len();
            assert_eq!(
                rewrite_bind_start(
                    &start[..12],
                    &mut client,
                    &mut server,
                    10,
                    &mut out,
                    &mut tracker
                ),
                BindStart::AsIs
            );
            assert_eq!(out.len(), before, "nothing written");
        }
    }

    #[test]
    fn unknown_statement_is_left_for_postgresql_to_report() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        assert!(rw(&bind_msg("nope"), &mut client, &mut server, 10).is_none());
    }

    #[test]
    fn close_forgets_the_client_name_and_answers_itself() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        rw(&parse_msg("s1", "select 1"), &mut client, &mut server, 10);
        let r = rw(&msg(b'C', b"Ss1\0"), &mut client, &mut server, 10).expect("rewritten");
        assert!(r.to_server.is_empty());
        assert_eq!(r.pending, vec![Pending::Inject(b'3')]);
        assert!(client.get("s1").is_none());
        assert_eq!(server.len(), 1);
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_statement() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        for i in 0..3 {
            rw(
                &parse_msg(&format!("s{i}"), &format!("select {i}")),
                &mut client,
                &mut server,
                2,
            );
        }
        assert_eq!(server.len(), 2);
        let oldest = client.get("s0").expect("tracked").server_name.clone();
        assert!(!server.contains(&oldest));
    }

    #[test]
    fn an_error_abandons_the_batch_until_sync() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut tracker = Tracker::default();
        let r = rw(
            &parse_msg("s1", "select nope"),
            &mut client,
            &mut server,
            10,
        )
        .expect("rewritten");
        for p in r.pending {
            tracker.push(p);
        }
        tracker.push(Pending::Reply {
            request: b'B',
            parse_of: None,
        });
        tracker.push(Pending::Reply {
            request: b'S',
            parse_of: None,
        });
        assert_eq!(
            tracker.on_server_message(b'E', &mut server),
            Verdict::Forward
        );
        assert!(server.is_empty(), "a failed Parse leaves no statement");
        assert_eq!(
            tracker.on_server_message(b'Z', &mut server),
            Verdict::Forward
        );
        assert!(tracker.is_empty());
    }
}
