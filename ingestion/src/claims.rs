//! Claims on the shared data folder. Renames and `create_new` are atomic on one file
//! system, so two ingestion instances sharing a landing folder never claim the same
//! file, and never both ingest the same content.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use pipeline::PipelineError;

/// The folders ingestion works in, all below one data directory.
#[derive(Debug, Clone)]
pub struct Folders {
    /// Drop folder, scanned for new files.
    pub landing: PathBuf,
    /// Files named by `StartDataIntakeCommand`s live here; it is not scanned.
    pub intake: PathBuf,
    /// This instance's claimed files. Each instance has its own, so a restarted
    /// instance recovers only its own work.
    pub processing: PathBuf,
    /// Encrypted raw files, `<batch id>.enc`: the claim check.
    pub archive: PathBuf,
    /// Files that failed or were refused. Never deleted by medpipe.
    pub quarantine: PathBuf,
    /// `<sha256>.json` per content ever claimed, and `commands/<command id>`.
    pub claims: PathBuf,
}

impl Folders {
    pub fn under(root: &Path, instance_id: &str) -> Self {
        Folders {
            landing: root.join("landing"),
            intake: root.join("intake"),
            processing: root.join("processing").join(instance_id),
            archive: root.join("archive"),
            quarantine: root.join("quarantine"),
            claims: root.join("claims"),
        }
    }

    pub fn create(&self) -> Result<(), PipelineError> {
        for d in [
            &self.landing,
            &self.intake,
            &self.processing,
            &self.archive,
            &self.quarantine,
            &self.claims,
            &self.claims.join("commands"),
            &self.claims.join("retries"),
        ] {
            std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
        }
        Ok(())
    }
}

pub(crate) fn io(path: &Path, e: std::io::Error) -> PipelineError {
    PipelineError::io(path.display().to_string(), e)
}

/// Separates the unique claim prefix from the original name in `processing/`.
const SEP: &str = "__";
/// Suffix of the sidecar that records the command a claimed file came with.
const COMMAND_SIDECAR: &str = ".command.json";

/// The name a file gets when claimed: unique, so equal names never overwrite.
pub fn claimed_name(original: &str) -> String {
    format!("{}{SEP}{original}", Uuid::new_v4().simple())
}

/// The name a retry's clear copy gets in `processing/`: fixed by the request, so a
/// redelivered request finds the copy it already made.
pub fn retry_claimed_name(request: &str, original: &str) -> String {
    format!("retry-{request}{SEP}{original}")
}

/// The original name of a claimed file.
pub fn original_name(claimed: &str) -> &str {
    claimed.split_once(SEP).map_or(claimed, |(_, rest)| rest)
}

pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Claims a file by renaming it into `processing/`. `None` if another instance (or a
/// concurrent command) took it first.
pub fn claim(path: &Path, processing: &Path) -> Result<Option<PathBuf>, PipelineError> {
    let dest = processing.join(claimed_name(&file_name(path)));
    match std::fs::rename(path, &dest) {
        Ok(()) => Ok(Some(dest)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Data files in a folder, oldest name first; hidden, partial and sidecar files are skipped.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>, PipelineError> {
    let rd = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| {
            let n = file_name(p);
            !n.starts_with('.') && !n.ends_with(COMMAND_SIDECAR) && !n.ends_with(".tmp")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Who first claimed a file content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentClaim {
    pub batch_id: String,
    pub instance_id: String,
    /// The claimed file's name in `processing/` of that instance.
    pub claimed_as: String,
}

pub enum ContentClaimed {
    /// This call made the claim.
    New,
    /// The content was claimed before, by this or another instance.
    Existing(ContentClaim),
}

/// Claims a content hash for a batch, atomically across instances. The claim is
/// written to a temporary file first and hard-linked into place, which fails if the
/// name exists, so a claim file is never seen half-written.
pub fn claim_content(
    claims: &Path,
    sha256: &str,
    claim: &ContentClaim,
) -> Result<ContentClaimed, PipelineError> {
    let path = claims.join(format!("{sha256}.json"));
    let body = serde_json::to_vec(claim).map_err(PipelineError::serialize("a claim"))?;
    let tmp = claims.join(format!(".{sha256}.{}.tmp", Uuid::new_v4().simple()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(&body).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(ContentClaimed::New),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let existing = std::fs::read(&path).map_err(|e| io(&path, e))?;
            let existing = serde_json::from_slice(&existing)
                .map_err(|e| PipelineError::storage(path.display().to_string(), e))?;
            Ok(ContentClaimed::Existing(existing))
        }
        Err(e) => Err(io(&path, e)),
    }
}

/// What a command said about the file it named, kept beside the claimed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSidecar {
    pub command_id: String,
    pub command_event_id: String,
    pub format: Option<String>,
    /// For a retry (`BatchRetryRequested`, whose request id is `command_id`): the batch
    /// this file is a new attempt of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// A release (`BatchReleaseRequested`) rather than a retry: the new batch is
    /// published as partial.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release: bool,
    /// A reprocessing (`BatchReprocessRequested`): the versions it must run under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprocess: Option<crate::batch::Reprocess>,
}

impl CommandSidecar {
    /// For a new attempt of a batch: `retry`, `release` or `reprocess`.
    pub fn attempt(&self) -> &'static str {
        if self.release {
            "release"
        } else if self.reprocess.is_some() {
            "reprocess"
        } else {
            "retry"
        }
    }
}

pub fn sidecar_path(claimed: &Path) -> PathBuf {
    let mut name = claimed.as_os_str().to_os_string();
    name.push(COMMAND_SIDECAR);
    PathBuf::from(name)
}

pub fn read_sidecar(claimed: &Path) -> Result<Option<CommandSidecar>, PipelineError> {
    let path = sidecar_path(claimed);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| PipelineError::storage(path.display().to_string(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path, e)),
    }
}

/// Writes a small file atomically: temp file, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PipelineError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Resolves a command's file path inside the intake folder. Absolute paths, `..` and
/// anything that resolves outside the folder are refused.
pub fn resolve_intake(intake: &Path, relative: &str) -> Result<PathBuf, &'static str> {
    let rel = Path::new(relative);
    if relative.is_empty()
        || rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err("outside_intake");
    }
    let path = intake.join(rel);
    match (path.canonicalize(), intake.canonicalize()) {
        (Ok(p), Ok(root)) if p.starts_with(&root) && p.is_file() => Ok(path),
        (Ok(p), Ok(root)) if !p.starts_with(&root) => Err("outside_intake"),
        _ => Err("not_found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_names_are_unique_and_keep_the_original() {
        let a = claimed_name("patients.csv");
        assert_ne!(a, claimed_name("patients.csv"));
        assert_eq!(original_name(&a), "patients.csv");
        assert_eq!(original_name("x__y__z.csv"), "y__z.csv");
    }

    #[test]
    fn a_file_is_claimed_once_and_content_once() {
        let dir = tempfile::tempdir().expect("dir");
        let f = Folders::under(dir.path(), "a");
        f.create().expect("create");
        let p = f.landing.join("x.csv");
        std::fs::write(&p, "a,b\n").expect("write");
        let claimed = claim(&p, &f.processing).expect("claim").expect("claimed");
        assert!(claim(&p, &f.processing).expect("claim").is_none());
        assert_eq!(files_in(&f.processing).expect("ls"), vec![claimed]);
        let c = ContentClaim {
            batch_id: "b".into(),
            instance_id: "a".into(),
            claimed_as: "n".into(),
        };
        assert!(matches!(
            claim_content(&f.claims, "ab", &c).expect("c"),
            ContentClaimed::New
        ));
        match claim_content(&f.claims, "ab", &c).expect("c") {
            ContentClaimed::Existing(e) => assert_eq!(e, c),
            ContentClaimed::New => panic!("claimed twice"),
        }
    }

    #[test]
    fn intake_paths_cannot_escape() {
        let dir = tempfile::tempdir().expect("dir");
        let intake = dir.path().join("intake");
        std::fs::create_dir_all(intake.join("sub")).expect("mkdir");
        std::fs::write(intake.join("sub/a.csv"), "x").expect("write");
        std::fs::write(dir.path().join("secret"), "x").expect("write");
        assert!(resolve_intake(&intake, "sub/a.csv").is_ok());
        assert_eq!(resolve_intake(&intake, "../secret"), Err("outside_intake"));
        assert_eq!(
            resolve_intake(&intake, "/etc/passwd"),
            Err("outside_intake")
        );
        assert_eq!(resolve_intake(&intake, "sub/none.csv"), Err("not_found"));
        assert_eq!(resolve_intake(&intake, ""), Err("outside_intake"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret"), intake.join("link"))
                .expect("link");
            assert_eq!(resolve_intake(&intake, "link"), Err("outside_intake"));
        }
    }
}
