//! Long background work (copies of the whole database) on its own OS thread at a lower CPU
//! priority, awaited from async code.
//!
//! Owns: [`run_niced`]. Why a thread of its own and not `spawn_blocking`: Linux nice values are
//! per thread and an unprivileged process cannot raise a thread's priority back, so a pool
//! thread that ran niced work would stay slow for the requests it serves later. Must not touch:
//! anything the work itself does; the caller decides what runs here.

use crate::core::{Error, Result};

/// Run `work` on a new thread named `name` at nice `nice` (0 = the process's priority; 19 =
/// the lowest: under CPU contention every other thread goes first, so request latency does not
/// suffer while the work takes longer). Returns what `work` returned; a panic in it becomes an
/// internal error. Off Linux the priority is left as it is.
pub async fn run_niced<T, F>(name: &str, nice: i32, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if nice > 0 {
                lower_this_thread(nice);
            }
            let _ = tx.send(work());
        })
        .map_err(|e| Error::internal(format!("starting the {name} thread: {e}")))?;
    rx.await
        .map_err(|_| Error::internal(format!("the {name} thread stopped without a result (panicked)")))
}

/// Lower the calling thread's CPU priority to nice `nice` (Linux; per thread).
pub fn lower_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread (Linux nice values are per thread).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice.clamp(0, 19));
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_niced_and_reports_panics() {
        let nice = run_niced("nice-test", 19, || {
            #[cfg(target_os = "linux")]
            // SAFETY: reads the calling thread's priority.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
            #[cfg(not(target_os = "linux"))]
            19
        })
        .await
        .unwrap();
        assert_eq!(nice, 19);
        let err = run_niced("panic-test", 0, || -> i32 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(format!("{err}").contains("panic-test"), "{err}");
    }
}
