//! Cancel requests. Each client gets BackendKeyData chosen by pgswitch; a CancelRequest carrying
//! those keys is forwarded to whichever server the client is using at that moment — never to a
//! server it no longer holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use tracing::{debug, info};

use crate::backend;

/// The server backend a client's query currently runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: std::sync::Arc<str>,
    pub port: u16,
    pub pid: u32,
    pub secret: u32,
}

/// Where a client's cancel goes now; updated when the client attaches or releases a server.
#[derive(Debug, Default)]
pub struct CancelSlot {
    // parking_lot: set twice per transaction, without std's poison bookkeeping.
    current: parking_lot::Mutex<Current>,
}

#[derive(Debug, Default)]
struct Current {
    target: Option<Arc<CancelTarget>>,
    /// A cancel request was forwarded to `target`: becomes true once PostgreSQL has it.
    forwarded: Option<CancelForwarded>,
    /// Wakes the client's session, so that it looks at limits a reload changed (see
    /// `CancelRegistry::wake_all`). Set once, when the session starts relaying.
    session: Option<Waker>,
}

/// Tells the holder of a server that a cancel request was forwarded to it, and when PostgreSQL
/// has taken it (the request's connection closed, or its sending gave up).
#[derive(Debug)]
pub struct CancelForwarded(tokio::sync::watch::Receiver<bool>);

impl CancelForwarded {
    /// Waits until PostgreSQL has taken the cancel request (or its sending failed).
    pub async fn delivered(mut self) {
        let _ = self.0.wait_for(|done| *done).await;
    }
}

impl CancelSlot {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Current> {
        self.current.lock()
    }

    /// Points the client's cancels at `target` (or nowhere). Returns whether a cancel request
    /// was forwarded to the previous target since it was set.
    pub fn set(&self, target: Option<Arc<CancelTarget>>) -> Option<CancelForwarded> {
        let mut current = self.lock();
        // The old target is dropped after the lock is released.
        let _old = std::mem::replace(&mut current.target, target);
        current.forwarded.take()
    }

    /// Remembers the task of the client's session, for `CancelRegistry::wake_all`.
    pub fn set_waker(&self, waker: &Waker) {
        self.lock().session = Some(waker.clone());
    }

    /// The current target, marked as cancelled: the holder of the server learns about it when
    /// it moves the slot on. Send `true` on the sender (or drop it) once the request is sent.
    fn forward(&self) -> Option<(Arc<CancelTarget>, tokio::sync::watch::Sender<bool>)> {
        let mut current = self.lock();
        let target = current.target.clone()?;
        let (sent, forwarded) = tokio::sync::watch::channel(false);
        current.forwarded = Some(CancelForwarded(forwarded));
        Some((target, sent))
    }
}

struct Entry {
    secret: u32,
    slot: Arc<CancelSlot>,
}

/// The keys handed to clients, and the slot behind each.
#[derive(Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<u32, Entry>>,
}

/// A client's registration; removes itself when the session ends.
pub struct CancelKey {
    pub pid: u32,
    pub secret: u32,
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands out a fresh random key pair for a client.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let slot = Arc::new(CancelSlot::default());
        let secret: u32 = rand::random();
        let mut entries = self.lock();
        let pid = loop {
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid != 0 && !entries.contains_key(&pid) {
                break pid;
            }
        };
        entries.insert(
            pid,
            Entry {
                secret,
                slot: slot.clone(),
            },
        );
        CancelKey {
            pid,
            secret,
            slot,
            registry: self.clone(),
        }
    }

    /// Wakes every client's session once: a reload changed a limit that sessions check when they
    /// are polled (the idle timeouts), and a client that already sits idle must not wait for its
    /// next request to see it. A session woken with nothing to do looks at its limits and goes
    /// back to waiting.
    pub fn wake_all(&self) {
        let wakers: Vec<Waker> = self
            .lock()
            .values()
            .filter_map(|entry| entry.slot.lock().session.clone())
            .collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Forwards a client's CancelRequest to the server running its query, if the keys match.
    pub async fn cancel(&self, pid: u32, secret: u32) {
        let target = {
            let entries = self.lock();
            match entries.get(&pid) {
                Some(entry) if entry.secret == secret => entry.slot.forward(),
                _ => None,
            }
        };
        let Some((t, delivered)) = target else {
            debug!(
                pid,
                "cancel request with unknown keys or no running query ignored"
            );
            return;
        };
        info!(pid, server_pid = t.pid, host = %t.host, port = t.port, "forwarding cancel request");
        if let Err(e) = backend::send_cancel(&t).await {
            info!(pid, error = %e, "cancel request could not be delivered");
        }
        let _ = delivered.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn target(pid: u32) -> Arc<CancelTarget> {
        Arc::new(CancelTarget {
            host: "127.0.0.1".into(),
            port: 1,
            pid,
            secret: 2,
        })
    }

    #[tokio::test]
    async fn a_forwarded_cancel_is_reported_to_whoever_moves_the_slot_on() {
        let slot = CancelSlot::default();
        assert!(slot.forward().is_none(), "no server: nothing to cancel");
        assert!(slot.set(Some(target(7))).is_none());
        let (to, sent) = slot.forward().expect("the current server");
        assert_eq!(to.pid, 7);
        let forwarded = slot
            .set(None)
            .expect("releasing the server reports the cancel");
        assert!(slot.set(Some(target(8))).is_none(), "reported once");
        let waiting = tokio::spawn(forwarded.delivered());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "not delivered before it is sent");
        sent.send(true).expect("receiver alive");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("delivered once sent")
            .expect("task");
    }

    #[tokio::test]
    async fn a_cancel_that_could_not_be_sent_does_not_hold_the_server() {
        let slot = CancelSlot::default();
        slot.set(Some(target(7)));
        let (_, sent) = slot.forward().expect("the current server");
        let forwarded = slot.set(None).expect("reported");
        drop(sent);
        tokio::time::timeout(Duration::from_secs(5), forwarded.delivered())
            .await
            .expect("a dropped sender ends the wait");
    }
}
