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

/// A small file system of its own (a tmpfs) that a test can fill up and free again, for
/// a real ENOSPC. Mounting needs root, which the CI machine and the dev machine give.
/// Dropping it unmounts (lazily, so a stage still holding files cannot block it).
pub struct SmallDisk {
    path: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB on `path` (created if missing, and empty).
    pub fn mount(path: &std::path::Path, mib: u64) -> SmallDisk {
        std::fs::create_dir_all(path).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} failed (the disk-full tests need root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk {
            path: path.to_path_buf(),
            filler: path.join("zz-filler.bin"),
        }
    }

    /// Writes a filler file until the file system refuses with ENOSPC, then returns
    /// how many bytes it took.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("create the filler");
        let mut written = 0u64;
        let mut chunk = 1 << 20;
        let block = vec![0x5a_u8; chunk];
        while chunk > 0 {
            match f.write(&block[..chunk]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => chunk /= 2,
                Err(e) => panic!("filling {} failed: {e}", self.path.display()),
            }
        }
        written
    }

    /// Removes the filler: the space is back.
    pub fn free(&self) {
        std::fs::remove_file(&self.filler).expect("remove the filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}
