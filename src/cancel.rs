//! Cancel requests. Each client gets BackendKeyData chosen by pgswitch; a CancelRequest carrying
//! those keys is forwarded to whichever server the client is using at that moment — never to a
//! server it no longer holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

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
    target: Mutex<Option<Arc<CancelTarget>>>,
}

impl CancelSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Arc<CancelTarget>>> {
        self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, target: Option<Arc<CancelTarget>>) {
        // The old target is dropped after the lock is released.
        let _old = std::mem::replace(&mut *self.lock(), target);
    }

    pub fn get(&self) -> Option<Arc<CancelTarget>> {
        self.lock().clone()
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

    /// Forwards a client's CancelRequest to the server running its query, if the keys match.
    pub async fn cancel(&self, pid: u32, secret: u32) {
        let target = {
            let entries = self.lock();
            match entries.get(&pid) {
                Some(entry) if entry.secret == secret => entry.slot.get(),
                _ => None,
            }
        };
        let Some(t) = target else {
            debug!(
                pid,
                "cancel request with unknown keys or no running query ignored"
            );
            return;
        };
        info!(pid, server_pid = t.pid, host = %t.host, port = t.port, "forwarding cancel request");
        if let Err(e) = backend::send_cancel(&t.host, t.port, t.pid, t.secret).await {
            info!(pid, error = %e, "cancel request could not be delivered");
        }
    }
}
