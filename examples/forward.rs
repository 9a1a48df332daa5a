//! The floor for `benches/pgbench.sh`: a TCP forwarder that does nothing a proxy could skip.
//!
//! `forward LISTEN_PORT SERVER_PORT` accepts on 127.0.0.1:LISTEN_PORT and gives every client its
//! own connection to 127.0.0.1:SERVER_PORT (no pooling, no parsing, no authentication of its
//! own), then copies bytes both ways on one thread: a level-triggered `epoll_wait`, one `read` per
//! readable socket, one `write` of what it read. Per transaction that is the two reads and two
//! writes any proxy in the middle must make, and nothing else, so its TPS through pgbench is what
//! a proxy on this machine can reach at most when it pools nothing (at 10 clients a pool of 20 does
//! not cut the number of PostgreSQL backends either). The benchmark prints pgswitch's TPS as a
//! fraction of it. Not part of pgswitch; built with `cargo build --release --example forward`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

fn epoll_add(epoll: i32, fd: i32) -> std::io::Result<()> {
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: epoll and fd are open descriptors; event is a valid epoll_event.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<Option<u16>> = std::env::args().skip(1).map(|a| a.parse().ok()).collect();
    let [Some(listen_port), Some(server_port)] = args[..] else {
        eprintln!("usage: forward LISTEN_PORT SERVER_PORT");
        std::process::exit(2);
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, listen_port))?;
    // SAFETY: plain system call, no pointers.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error());
    }
    epoll_add(epoll, listener.as_raw_fd())?;
    // Indexed by fd: the socket and the fd of the other side.
    let mut sockets: Vec<Option<(TcpStream, i32)>> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    let mut closing = Vec::new();
    loop {
        // SAFETY: events has room for events.len() entries.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in &events[..n as usize] {
            let fd = event.u64 as i32;
            if fd == listener.as_raw_fd() {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) => {
                        eprintln!("forward: accept: {e}");
                        continue;
                    }
                };
                let server = match TcpStream::connect((Ipv4Addr::LOCALHOST, server_port)) {
                    Ok(server) => server,
                    Err(e) => {
                        eprintln!("forward: connect to port {server_port}: {e}");
                        continue; // dropping client closes it
                    }
                };
                client.set_nodelay(true)?;
                server.set_nodelay(true)?;
                let (c, s) = (client.as_raw_fd(), server.as_raw_fd());
                epoll_add(epoll, c)?;
                epoll_add(epoll, s)?;
                let top = c.max(s) as usize;
                if sockets.len() <= top {
                    sockets.resize_with(top + 1, || None);
                }
                sockets[c as usize] = Some((client, s));
                sockets[s as usize] = Some((server, c));
                continue;
            }
            let Some(Some((socket, peer))) = sockets.get_mut(fd as usize) else {
                continue; // closed earlier in this batch with its peer
            };
            let peer = *peer;
            let read = socket.read(&mut buf).unwrap_or(0);
            let written = read > 0
                && sockets
                    .get_mut(peer as usize)
                    .and_then(Option::as_mut)
                    .is_some_and(|(other, _)| other.write_all(&buf[..read]).is_ok());
            if !written {
                // Either side closed or failed: close both, after this batch, so that no fd is
                // reused while events for it are still to be handled.
                closing.extend(sockets[fd as usize].take());
                closing.extend(sockets[peer as usize].take());
            }
        }
        closing.clear(); // dropping a socket closes it and removes it from epoll
    }
}
