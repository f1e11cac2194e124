//! Broker faults for the end-to-end tests: SIGKILL, SIGSTOP and restart of the dev-stack
//! Kafka broker through `scripts/devstack.sh`, so the tests exercise the same path an
//! operator would.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn devstack() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/devstack.sh")
}

fn run(cmd: &str) {
    let out = Command::new("bash")
        .arg(devstack())
        .arg(cmd)
        .output()
        .expect("run scripts/devstack.sh");
    assert!(
        out.status.success(),
        "devstack.sh {cmd} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The dev-stack broker under test. Dropping it (also when a test panics) leaves the
/// broker running again, so one failed test does not take the rest of the suite down.
pub struct Broker {
    _private: (),
}

impl Broker {
    pub fn new() -> Broker {
        Broker { _private: () }
    }

    /// SIGKILL: no clean shutdown, open transactions and group sessions are cut off.
    pub fn crash(&self) {
        run("crash-broker");
    }

    /// Starts the broker again with its data (as after a crash) and waits until it
    /// answers.
    pub fn start(&self) {
        run("start");
    }

    /// Crashes the broker, keeps it down for `down`, and starts it again.
    pub fn crash_and_restart(&self, down: Duration) {
        self.crash();
        std::thread::sleep(down);
        self.start();
    }

    /// SIGSTOP: the broker stops answering but keeps its sockets open.
    pub fn pause(&self) {
        run("pause-broker");
    }

    pub fn resume(&self) {
        run("resume-broker");
    }
}

/// The dev-stack Schema Registry under test. Dropping it leaves the registry running.
pub struct Registry {
    _private: (),
}

impl Registry {
    pub fn new() -> Registry {
        Registry { _private: () }
    }

    /// SIGSTOP: the registry stops answering (its in-memory schemas are kept, as a
    /// registry with durable storage keeps them across an outage).
    pub fn pause(&self) {
        run("pause-registry");
    }

    pub fn resume(&self) {
        run("resume-registry");
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(devstack())
            .arg("resume-registry")
            .output();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(devstack())
            .arg("resume-broker")
            .output();
        let _ = Command::new("bash").arg(devstack()).arg("start").output();
    }
}
