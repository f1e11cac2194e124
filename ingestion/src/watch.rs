//! Wakes the ingestion loop as soon as something lands, instead of at its next poll.
//!
//! A `notify` watcher (inotify on Linux) on the landing folder signals a channel on every
//! event; the loop waits on that channel with its poll interval as the timeout. The
//! watcher is only a wake-up: which files are there is still read from the folder, so a
//! missed or coalesced event costs at most one poll interval. Where no watcher can be set
//! up (inotify limits, some network file systems), the loop just polls.

use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tracing::warn;

/// Whether an event can mean a file arrived: created, moved in, or written and closed.
/// Not opening or reading: the loop's own listing of the folder opens it, and waking on
/// that would wake the loop again at once, for ever.
fn lands(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Data(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// A wake-up on changes in one folder, or plain sleeping when none could be set up.
pub struct LandingWatch {
    inner: Option<(RecommendedWatcher, Receiver<()>)>,
}

impl LandingWatch {
    /// Watches `dir` (not its subfolders).
    pub fn new(dir: &Path) -> Self {
        let (tx, rx) = channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| lands(&e.kind)) {
                // The receiver is gone only while the process is stopping.
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w));
        match watcher {
            Ok(w) => LandingWatch {
                inner: Some((w, rx)),
            },
            Err(e) => {
                warn!(error = %e, folder = %dir.display(), "Cannot watch the landing folder; polling it instead.");
                LandingWatch { inner: None }
            }
        }
    }

    /// Whether a watcher is set up.
    pub fn is_watching(&self) -> bool {
        self.inner.is_some()
    }

    /// Returns when something changed in the folder (true), or after `timeout` (false).
    /// Wake-ups that piled up meanwhile are taken together.
    pub fn wait(&self, timeout: Duration) -> bool {
        let Some((_, rx)) = &self.inner else {
            std::thread::sleep(timeout);
            return false;
        };
        match rx.recv_timeout(timeout) {
            Ok(()) => {
                while rx.try_recv().is_ok() {}
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            // The watcher stopped delivering: poll from now on.
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(timeout);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_landing_wakes_the_wait_before_its_timeout() {
        let dir = tempfile::tempdir().expect("temp dir");
        let watch = LandingWatch::new(dir.path());
        assert!(watch.is_watching());
        let path = dir.path().join("a.ndjson");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(path, b"{}\n").expect("write");
        });
        assert!(
            watch.wait(Duration::from_secs(60)),
            "the wait ended by its timeout, not by the file's event"
        );
        writer.join().expect("writer");
    }

    #[test]
    fn with_nothing_landing_the_wait_ends_by_its_timeout() {
        let dir = tempfile::tempdir().expect("temp dir");
        let watch = LandingWatch::new(dir.path());
        assert!(!watch.wait(Duration::from_millis(20)));
    }

    #[test]
    fn listing_and_reading_the_folder_wake_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a.ndjson"), b"{}\n").expect("write");
        let watch = LandingWatch::new(dir.path());
        // What the ingestion loop does on every round.
        let listed = crate::claims::files_in(dir.path()).expect("list");
        let _ = std::fs::read(&listed[0]).expect("read");
        assert!(!watch.wait(Duration::from_millis(200)));
    }

    #[test]
    fn a_file_moved_in_wakes_the_wait() {
        let dir = tempfile::tempdir().expect("temp dir");
        let landing = dir.path().join("landing");
        std::fs::create_dir(&landing).expect("mkdir");
        let staged = dir.path().join("b.ndjson");
        std::fs::write(&staged, b"{}\n").expect("write");
        let watch = LandingWatch::new(&landing);
        std::fs::rename(&staged, landing.join("b.ndjson")).expect("rename");
        assert!(watch.wait(Duration::from_secs(60)));
    }
}
