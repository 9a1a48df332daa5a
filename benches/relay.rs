//! Criterion micro-benchmarks of pgswitch's message framing / relay path (sans IO).
//!
//! Run with `cargo bench --bench relay` (add `-- --quick` for a short run, or a filter such as
//! `-- scanner`). What is measured:
//!
//! - `scanner/*`: `wire::Scanner::step` walking a realistic server response stream
//!   (RowDescription, DataRow x N, CommandComplete, ReadyForQuery) delivered in socket-sized
//!   chunks, the way the relay forwards server bytes without copying them. Throughput is in bytes.
//! - `take_message/*`: `wire::take_message` splitting a client's extended-protocol pipeline
//!   (Parse, Bind, Describe, Execute, Sync) off a `BytesMut`.
//! - `prepared/*`: `prepared::rewrite_client_message` for a Bind of a named prepared statement,
//!   both when the server connection already has the statement (the steady state of
//!   `pgbench -M prepared`) and when it must be prepared there first (an injected Parse).

use std::hint::black_box;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use pgswitch::prepared::{rewrite_client_message, ClientStatements, ServerStatements, Tracker};
use pgswitch::wire::{take_message, Scanner, Step};

const MAX_BODY: usize = 1 << 30;

/// One message: tag, length, body.
fn msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
}

/// RowDescription for `cols` columns named col0.. of type int4 (oid 23).
fn row_description(out: &mut BytesMut, cols: usize) {
    let mut b = BytesMut::new();
    b.put_u16(cols as u16);
    for i in 0..cols {
        b.put_slice(format!("col{i}").as_bytes());
        b.put_u8(0);
        b.put_u32(16_384); // table oid
        b.put_u16(i as u16 + 1); // attnum
        b.put_u32(23); // int4
        b.put_i16(4);
        b.put_i32(-1);
        b.put_i16(0); // text
    }
    msg(out, b'T', &b);
}

/// DataRow with `cols` text values of `width` bytes each.
fn data_row(out: &mut BytesMut, cols: usize, width: usize) {
    let mut b = BytesMut::new();
    b.put_u16(cols as u16);
    for c in 0..cols {
        b.put_i32(width as i32);
        for k in 0..width {
            b.put_u8(b'0' + ((c + k) % 10) as u8);
        }
    }
    msg(out, b'D', &b);
}

/// A complete response to one SELECT: T, D x rows, C, Z.
fn response(rows: usize, cols: usize, width: usize) -> Bytes {
    let mut out = BytesMut::new();
    row_description(&mut out, cols);
    for _ in 0..rows {
        data_row(&mut out, cols, width);
    }
    msg(&mut out, b'C', format!("SELECT {rows}\0").as_bytes());
    msg(&mut out, b'Z', b"I");
    out.freeze()
}

/// Walks `chunks` with one Scanner; returns (messages, ReadyForQuery seen) so nothing is
/// optimised away.
fn scan(chunks: &[Bytes]) -> (usize, bool) {
    let mut s = Scanner::new();
    let mut messages = 0;
    let mut ready = false;
    for chunk in chunks {
        let mut pos = 0;
        while let Some(step) = s
            .step(chunk, &mut pos, MAX_BODY)
            .expect("well-formed stream")
        {
            if let Step::End { tag, .. } = step {
                messages += 1;
                ready |= tag == b'Z';
            }
        }
    }
    assert!(s.at_boundary());
    (messages, ready)
}

fn chunked(stream: &Bytes, chunk: usize) -> Vec<Bytes> {
    (0..stream.len())
        .step_by(chunk)
        .map(|at| stream.slice(at..(at + chunk).min(stream.len())))
        .collect()
}

fn bench_scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("scanner");
    // pgbench -S: one int4 column, one row; 100 rows x 5 cols x 12 bytes; 1000 rows, wider.
    let cases = [
        ("pgbench_select_1row", response(1, 1, 6), 8192),
        ("100rows_5cols_8k_chunks", response(100, 5, 12), 8192),
        ("100rows_5cols_1460_chunks", response(100, 5, 12), 1460),
        ("1000rows_10cols_64k_chunks", response(1000, 10, 20), 65536),
    ];
    for (name, stream, chunk) in cases {
        let chunks = chunked(&stream, chunk);
        let expected = scan(&chunks).0;
        assert!(expected >= 4);
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(name, |b| b.iter(|| scan(black_box(&chunks))));
    }
    g.finish();
}

/// The pipeline a `pgbench -M extended` client sends per transaction.
fn extended_pipeline() -> BytesMut {
    let mut out = BytesMut::new();
    msg(
        &mut out,
        b'P',
        b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
    );
    out.put_slice(&bind(b"", b"12345"));
    msg(&mut out, b'D', b"P\0");
    msg(&mut out, b'E', b"\0\0\0\0\0");
    msg(&mut out, b'S', b"");
    out
}

/// Bind of `stmt` (unnamed portal) with one text parameter, text results.
fn bind(stmt: &[u8], param: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0); // portal ""
    b.put_slice(stmt);
    b.put_u8(0);
    b.put_i16(0); // parameter formats: all text
    b.put_i16(1);
    b.put_i32(param.len() as i32);
    b.put_slice(param);
    b.put_i16(0); // result formats: all text
    let mut out = BytesMut::new();
    msg(&mut out, b'B', &b);
    out.freeze()
}

fn bench_take_message(c: &mut Criterion) {
    let mut g = c.benchmark_group("take_message");
    let pipeline = extended_pipeline();
    g.throughput(Throughput::Elements(5));
    g.bench_function("extended_pipeline_5_msgs", |b| {
        b.iter_batched(
            || pipeline.clone(),
            |mut buf| {
                let mut n = 0;
                while let Some((tag, body)) = take_message(&mut buf, MAX_BODY).unwrap() {
                    black_box((tag, body));
                    n += 1;
                }
                assert_eq!(n, 5);
                buf
            },
            BatchSize::SmallInput,
        )
    });
    // The same pipeline arriving one message short: the last call must report "incomplete".
    let partial = {
        let mut p = pipeline.clone();
        p.truncate(p.len() - 3);
        p
    };
    g.bench_function("extended_pipeline_partial_tail", |b| {
        b.iter_batched(
            || partial.clone(),
            |mut buf| {
                while let Some(m) = take_message(&mut buf, MAX_BODY).unwrap() {
                    black_box(m);
                }
                buf
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_prepared(c: &mut Criterion) {
    let mut g = c.benchmark_group("prepared");
    const CAPACITY: usize = 256;
    let parse = {
        let mut out = BytesMut::new();
        msg(
            &mut out,
            b'P',
            b"P0_1\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
        );
        out.freeze()
    };
    let bind_msg = bind(b"P0_1", b"12345");

    // Steady state: the client knows P0_1 and the server connection already has it.
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut tracker = Tracker::default();
    assert!(rewrite_client_message(
        &parse,
        &mut client,
        &mut server,
        CAPACITY,
        &mut out,
        &mut tracker
    ));
    out.clear();
    tracker.clear();
    assert!(rewrite_client_message(
        &bind_msg,
        &mut client,
        &mut server,
        CAPACITY,
        &mut out,
        &mut tracker
    ));
    assert_eq!(
        out[0], b'B',
        "statement already on the server: only the Bind"
    );
    assert_eq!(
        out.len(),
        1 + u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize
    );
    g.throughput(Throughput::Elements(1));
    g.bench_function("bind_statement_on_server", |b| {
        b.iter(|| {
            out.clear();
            tracker.clear();
            rewrite_client_message(
                black_box(&bind_msg),
                &mut client,
                &mut server,
                CAPACITY,
                &mut out,
                &mut tracker,
            )
        })
    });

    // The client's statement is not yet on this server connection: Parse is injected first.
    out.clear();
    tracker.clear();
    assert!(rewrite_client_message(
        &bind_msg,
        &mut client,
        &mut ServerStatements::default(),
        CAPACITY,
        &mut out,
        &mut tracker
    ));
    assert_eq!(out[0], b'P', "statement missing: Parse + Bind");
    g.bench_function("bind_statement_missing_on_server", |b| {
        b.iter_batched(
            ServerStatements::default,
            |mut fresh| {
                out.clear();
                tracker.clear();
                rewrite_client_message(
                    black_box(&bind_msg),
                    &mut client,
                    &mut fresh,
                    CAPACITY,
                    &mut out,
                    &mut tracker,
                );
                fresh
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_scanner, bench_take_message, bench_prepared);
criterion_main!(benches);
