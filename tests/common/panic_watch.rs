//! Records panics raised by pgswitch's own code (a file under `src/`) on any thread, so a test
//! can assert that the proxy never panicked even when tokio swallowed the panic of a task.
//! Include with `#[path = "common/panic_watch.rs"] mod panic_watch;`.
#![allow(dead_code)]

use std::sync::{Mutex, Once};

static INSTALL: Once = Once::new();
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the hook once per test binary; the default hook still prints every panic.
pub fn install() {
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(location) = info.location() {
                // Paths of the crate's own files are relative; dependencies' are absolute.
                if location.file().starts_with("src/") {
                    let thread = std::thread::current();
                    let entry = format!(
                        "thread {:?} panicked at {}:{}: {}",
                        thread.name().unwrap_or("?"),
                        location.file(),
                        location.line(),
                        payload(info)
                    );
                    PANICS.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
                }
            }
            default(info);
        }));
    });
}

fn payload(info: &std::panic::PanicHookInfo<'_>) -> String {
    if let Some(s) = info.payload().downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = info.payload().downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string payload)".to_string()
    }
}

/// Panics (failing the test) if pgswitch code panicked anywhere in this test binary so far.
pub fn assert_no_proxy_panics() {
    let panics = PANICS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        panics.is_empty(),
        "pgswitch panicked {} time(s):\n{}",
        panics.len(),
        panics.join("\n")
    );
}
