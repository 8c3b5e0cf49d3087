//! A training run's directory: who owns it, and checkpoints that are published whole or not at
//! all.
//!
//! ```text
//! run/
//!   .lock                          held (advisory lock) by the one trainer using the directory
//!   source.json, tokenizer.json    what the run trains on (written by the CLI)
//!   checkpoints/
//!     step-00000400/               one complete checkpoint: config.json, model.safetensors,
//!     step-00000600/                 optimizer.safetensors, trainer.json, manifest.json
//!     latest                       the name of the newest complete checkpoint
//!   config.json, model.safetensors the latest checkpoint's model (hard links), so the directory
//!                                  loads as a Hugging Face model
//!   metrics.jsonl, loss.svg
//! ```
//!
//! A checkpoint is written into `checkpoints/.tmp-step-N-<pid>/`, every file and the directory
//! fsynced, then renamed to `checkpoints/step-N` (one atomic rename) and named in `latest`
//! (written to a temporary file and renamed). A crash or a full disk at any moment leaves the
//! previous checkpoint complete and `latest` naming a complete checkpoint; the leftover
//! temporary directory is removed the next time a trainer opens the run. `manifest.json` records
//! the step and every file's size, and a checkpoint is loaded only when its files, its manifest,
//! its `trainer.json` and its directory name agree.

use std::fs::{self, File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use mamba_nn::checkpoint::{CheckpointError, write_atomic};
use serde::{Deserialize, Serialize};

/// A run directory that cannot be claimed, opened or checkpointed.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// A file system operation failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A new run was asked for in a directory that already holds one.
    #[error("{dir} already holds a training run; pass --resume to continue it, or choose another --out")]
    RunExists {
        /// The directory.
        dir: PathBuf,
    },
    /// A new run was asked for in a non-empty directory that is not a run directory.
    #[error(
        "{dir} is not empty and is not a training run directory (it holds {found}); refusing to write \
         into it — choose another --out"
    )]
    NotARun {
        /// The directory.
        dir: PathBuf,
        /// Some of what it holds.
        found: String,
    },
    /// Resuming a directory that holds no run.
    #[error("{dir} holds no training run to resume (no checkpoints/ directory)")]
    NoRun {
        /// The directory.
        dir: PathBuf,
    },
    /// Another process holds the run's lock.
    #[error(
        "{dir} is in use by another trainer (its lock {lock} is held); wait for it to finish or stop \
         it first"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// No complete, self-consistent checkpoint was found.
    #[error("{dir}: no complete checkpoint to resume from{details}")]
    NoCheckpoint {
        /// The `checkpoints/` directory.
        dir: PathBuf,
        /// What was found wrong with each candidate.
        details: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |cause| RunDirError::Io { path: path.to_path_buf(), cause }
}

/// `manifest.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Manifest {
    step: u64,
    /// (file name, size in bytes), every file of the checkpoint but the manifest.
    files: Vec<(String, u64)>,
}

/// A complete checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Its directory, `checkpoints/step-N`.
    pub path: PathBuf,
    /// The step it was taken after.
    pub step: u64,
}

/// A run directory owned by this process (its lock is held until this value is dropped or the
/// process ends, however it ends), or followed by it ([`RunDir::follow`]).
#[derive(Debug)]
pub struct RunDir {
    dir: PathBuf,
    /// The held lock; `None` for a follower, which never writes.
    lock: Option<File>,
}

const CHECKPOINTS: &str = "checkpoints";
const LATEST: &str = "latest";
const LOCK: &str = ".lock";
/// The files every checkpoint holds besides its manifest and its model.
pub const CHECKPOINT_FILES: [&str; 2] = ["optimizer.safetensors", "trainer.json"];
/// The model files of a checkpoint: a whole model, or (a LoRA run) a PEFT adapter. One of the
/// two pairs must be complete; both are linked at the top of the run directory.
pub const MODEL_FILES: [[&str; 2]; 2] =
    [["config.json", "model.safetensors"], ["adapter_config.json", "adapter_model.safetensors"]];

/// The files checkpoint directory `dir` must hold: [`CHECKPOINT_FILES`] and the first pair of
/// [`MODEL_FILES`] it has any file of (the whole model when it has neither).
fn required_files(dir: &Path) -> Vec<&'static str> {
    let pair = MODEL_FILES.iter().find(|p| p.iter().any(|f| dir.join(f).exists())).unwrap_or(&MODEL_FILES[0]);
    pair.iter().chain(CHECKPOINT_FILES.iter()).copied().collect()
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

impl RunDir {
    /// Claims `dir` for a new run: it must be absent, empty, or hold only what a new run's
    /// caller may have put there first (`source.json`, `tokenizer.json` of a run not yet
    /// started — no checkpoint). Creates it, takes its lock and makes `checkpoints/`.
    ///
    /// # Errors
    /// [`RunDirError::RunExists`] when it holds a run with a checkpoint,
    /// [`RunDirError::NotARun`] when it holds anything else, [`RunDirError::Locked`].
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, RunDirError> {
        let dir = dir.into();
        if dir.join(CHECKPOINTS).is_dir() || dir.join("trainer.json").exists() {
            return Err(RunDirError::RunExists { dir });
        }
        if dir.exists() {
            let entries = fs::read_dir(&dir).map_err(io(&dir))?;
            let mut found: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != LOCK)
                .collect();
            found.sort();
            if !found.is_empty() {
                let shown: Vec<String> = found.iter().take(4).map(|n| format!("`{n}`")).collect();
                let more =
                    if found.len() > 4 { format!(" and {} more", found.len() - 4) } else { String::new() };
                return Err(RunDirError::NotARun { dir, found: format!("{}{more}", shown.join(", ")) });
            }
        }
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let run = Self::lock(dir)?;
        let ck = run.dir.join(CHECKPOINTS);
        fs::create_dir_all(&ck).map_err(io(&ck))?;
        Ok(run)
    }

    /// Opens the run in `dir` to continue it: takes its lock and removes temporaries a killed
    /// trainer left behind.
    ///
    /// # Errors
    /// [`RunDirError::NoRun`] when `dir` holds no run, [`RunDirError::Locked`].
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, RunDirError> {
        let dir = dir.into();
        if !dir.join(CHECKPOINTS).is_dir() {
            return Err(RunDirError::NoRun { dir });
        }
        let run = Self::lock(dir)?;
        run.remove_temporaries()?;
        Ok(run)
    }

    fn lock(dir: PathBuf) -> Result<Self, RunDirError> {
        let path = dir.join(LOCK);
        let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { dir, lock: Some(file) }),
            Err(TryLockError::WouldBlock) => Err(RunDirError::Locked { dir, lock: path }),
            Err(TryLockError::Error(cause)) => Err(RunDirError::Io { path, cause }),
        }
    }

    /// The run in `dir` as seen by a data-parallel rank other than rank 0, which owns it: no
    /// lock, nothing created or removed, and nothing ever written ([`RunDir::save`] panics); it
    /// only reads checkpoints ([`RunDir::latest`]) to resume from.
    pub fn follow(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), lock: None }
    }

    /// Whether this is a [`RunDir::follow`]er, which writes nothing.
    pub fn is_follower(&self) -> bool {
        self.lock.is_none()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn checkpoints(&self) -> PathBuf {
        self.dir.join(CHECKPOINTS)
    }

    /// Where checkpoint `step` is (or would be) published: `checkpoints/step-N`.
    pub fn checkpoint_path(&self, step: u64) -> PathBuf {
        self.checkpoints().join(step_name(step))
    }

    /// Removes what an interrupted checkpoint leaves: `checkpoints/.tmp-*` directories and
    /// `.<name>.tmp-*` files.
    fn remove_temporaries(&self) -> Result<(), RunDirError> {
        for dir in [self.dir.clone(), self.checkpoints()] {
            let entries = fs::read_dir(&dir).map_err(io(&dir))?;
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") || (name.starts_with('.') && name.contains(".tmp-")) {
                    let p = e.path();
                    let r = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                    r.map_err(io(&p))?;
                }
            }
        }
        Ok(())
    }

    /// Writes checkpoint `step`: `write(tmp)` fills a fresh temporary directory with
    /// [`CHECKPOINT_FILES`] and one pair of [`MODEL_FILES`]; then the manifest is added, everything fsynced, the directory
    /// published as `checkpoints/step-N`, `latest` pointed at it, the top-level model files
    /// linked to it, and all but the newest `keep` (at least 1) checkpoints removed.
    ///
    /// On any error the temporary directory is removed and the previous checkpoint stays the
    /// latest.
    pub fn save<E: From<RunDirError>>(
        &self,
        step: u64,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<Checkpoint, E> {
        assert!(!self.is_follower(), "RunDir::save: a follower of {} never writes", self.dir.display());
        let ck = self.checkpoints();
        let tmp = ck.join(format!(".tmp-{}-{}", step_name(step), std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let result = write(&tmp).and_then(|()| self.seal(&tmp, step).map_err(E::from));
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(self.publish(&tmp, step, keep)?)
    }

    /// Adds the manifest and fsyncs every file and the directory.
    fn seal(&self, tmp: &Path, step: u64) -> Result<(), RunDirError> {
        let mut files = Vec::new();
        for name in required_files(tmp) {
            let p = tmp.join(name);
            let f = File::open(&p).map_err(io(&p))?;
            f.sync_all().map_err(io(&p))?;
            files.push((name.to_string(), f.metadata().map_err(io(&p))?.len()));
        }
        let manifest = serde_json::to_vec_pretty(&Manifest { step, files }).expect("a manifest serialises");
        let p = tmp.join("manifest.json");
        let mut f = File::create(&p).map_err(io(&p))?;
        f.write_all(&manifest).map_err(io(&p))?;
        f.sync_all().map_err(io(&p))?;
        sync_dir(tmp)
    }

    fn publish(&self, tmp: &Path, step: u64, keep: usize) -> Result<Checkpoint, RunDirError> {
        let ck = self.checkpoints();
        let path = ck.join(step_name(step));
        if path.exists() {
            // The same step again (a final save right after a resume): replace it.
            let old = ck.join(format!(".tmp-old-{}-{}", step_name(step), std::process::id()));
            fs::rename(&path, &old).map_err(io(&path))?;
            fs::rename(tmp, &path).map_err(io(&path))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(tmp, &path).map_err(io(&path))?;
        }
        sync_dir(&ck)?;
        write_file_atomic(&ck.join(LATEST), format!("{}\n", step_name(step)).as_bytes())?;
        sync_dir(&ck)?;
        for name in required_files(&path).into_iter().filter(|n| !CHECKPOINT_FILES.contains(n)) {
            link_atomic(&path.join(name), &self.dir.join(name))?;
        }
        sync_dir(&self.dir)?;
        self.prune(keep.max(1), step)?;
        Ok(Checkpoint { path, step })
    }

    /// Removes all but the newest `keep` checkpoints (never `latest`).
    fn prune(&self, keep: usize, latest: u64) -> Result<(), RunDirError> {
        let mut steps = self.steps()?;
        steps.sort_unstable_by(|a, b| b.cmp(a));
        for &s in steps.iter().skip(keep) {
            if s != latest {
                let p = self.checkpoints().join(step_name(s));
                fs::remove_dir_all(&p).map_err(io(&p))?;
            }
        }
        Ok(())
    }

    /// The steps of every `checkpoints/step-N` directory, complete or not.
    fn steps(&self) -> Result<Vec<u64>, RunDirError> {
        let ck = self.checkpoints();
        let entries = fs::read_dir(&ck).map_err(io(&ck))?;
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
            .collect())
    }

    /// Whether checkpoint `step` is complete and self-consistent: its manifest names the step
    /// and every checkpoint file at its recorded size, and its `trainer.json` records the same
    /// step. The reason when it is not.
    pub fn check(&self, step: u64) -> Result<Checkpoint, String> {
        let path = self.checkpoints().join(step_name(step));
        let text =
            fs::read_to_string(path.join("manifest.json")).map_err(|e| format!("manifest.json: {e}"))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("manifest.json: {e}"))?;
        if m.step != step {
            return Err(format!("manifest.json says step {}", m.step));
        }
        for name in required_files(&path) {
            let want = m.files.iter().find(|(n, _)| n == name).map(|f| f.1);
            let Some(want) = want else { return Err(format!("manifest.json does not list {name}")) };
            let got = fs::metadata(path.join(name)).map_err(|e| format!("{name}: {e}"))?.len();
            if got != want {
                return Err(format!("{name} has {got} bytes, the manifest says {want}"));
            }
        }
        let tj = fs::read_to_string(path.join("trainer.json")).map_err(|e| format!("trainer.json: {e}"))?;
        let v: serde_json::Value = serde_json::from_str(&tj).map_err(|e| format!("trainer.json: {e}"))?;
        match v.get("step").and_then(|s| s.as_u64()) {
            Some(s) if s == step => Ok(Checkpoint { path, step }),
            other => Err(format!("trainer.json records step {other:?}")),
        }
    }

    /// The checkpoint to resume from: the one `latest` names when it is complete, else the
    /// newest complete one. Also returns a note for each newer candidate that was skipped.
    ///
    /// # Errors
    /// [`RunDirError::NoCheckpoint`] when no checkpoint is complete.
    pub fn latest(&self) -> Result<(Checkpoint, Vec<String>), RunDirError> {
        let ck = self.checkpoints();
        let mut skipped = Vec::new();
        let named = fs::read_to_string(ck.join(LATEST))
            .ok()
            .and_then(|s| s.trim().strip_prefix("step-").and_then(|n| n.parse::<u64>().ok()));
        if let Some(step) = named {
            match self.check(step) {
                Ok(c) => return Ok((c, skipped)),
                Err(why) => skipped.push(format!("{} (named by `latest`): {why}", step_name(step))),
            }
        }
        let mut steps = self.steps()?;
        steps.sort_unstable_by(|a, b| b.cmp(a));
        for step in steps.into_iter().filter(|s| Some(*s) != named) {
            match self.check(step) {
                Ok(c) => return Ok((c, skipped)),
                Err(why) => skipped.push(format!("{}: {why}", step_name(step))),
            }
        }
        let details = if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) };
        Err(RunDirError::NoCheckpoint { dir: ck, details })
    }
}

fn sync_dir(dir: &Path) -> Result<(), RunDirError> {
    // Directories are fsynced through a read-only handle (Unix); elsewhere this is best effort.
    match File::open(dir) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(cause) => Err(RunDirError::Io { path: dir.into(), cause }),
    }
}

/// [`write_atomic`] (temporary file, fsync, rename; no temporary left on failure) with this
/// module's error.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    write_atomic(path, bytes).map_err(|e| match e {
        CheckpointError::Io { path, source } => RunDirError::Io { path, cause: source },
        other => RunDirError::Io { path: path.into(), cause: std::io::Error::other(other.to_string()) },
    })
}

/// Makes `dst` the same file as `src`: a hard link (a copy where links are not supported) made
/// under a temporary name and renamed over `dst`.
fn link_atomic(src: &Path, dst: &Path) -> Result<(), RunDirError> {
    let dir = dst.parent().unwrap_or(Path::new("."));
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let linked = match fs::hard_link(src, &tmp) {
        Ok(()) => Ok(()),
        Err(_) => fs::copy(src, &tmp).and_then(|_| File::open(&tmp)?.sync_all()).map_err(io(&tmp)),
    }
    .and_then(|()| fs::rename(&tmp, dst).map_err(io(dst)));
    if linked.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mamba-rundir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn write_all(dir: &Path, step: u64, model: &[u8]) -> Result<(), RunDirError> {
        write_with(dir, step, model, MODEL_FILES[0])
    }

    fn write_with(dir: &Path, step: u64, model: &[u8], pair: [&str; 2]) -> Result<(), RunDirError> {
        for name in pair.into_iter().chain(CHECKPOINT_FILES) {
            let bytes = match name {
                "trainer.json" => format!("{{\"step\": {step}}}").into_bytes(),
                "model.safetensors" | "adapter_model.safetensors" => model.to_vec(),
                _ => b"{}".to_vec(),
            };
            fs::write(dir.join(name), bytes).map_err(io(dir))?;
        }
        Ok(())
    }

    #[test]
    fn checkpoints_publish_prune_and_resume_from_the_newest_complete() {
        let d = tmp("publish");
        let run = RunDir::create(&d).unwrap();
        for step in 1..=4 {
            let c = run.save(step, 2, |t| write_all(t, step, &[step as u8; 10])).unwrap();
            assert_eq!(c.step, step);
        }
        let mut steps = run.steps().unwrap();
        steps.sort();
        assert_eq!(steps, [3, 4], "the newest two are kept");
        assert_eq!(fs::read(d.join("model.safetensors")).unwrap(), vec![4u8; 10], "top-level view");
        assert_eq!(run.latest().unwrap().0.step, 4);
        // A failed save leaves no trace and the previous checkpoint latest.
        let err = run.save(5, 2, |_| Err(RunDirError::NoRun { dir: "x".into() })).unwrap_err();
        assert!(matches!(err, RunDirError::NoRun { .. }));
        assert_eq!(run.latest().unwrap().0.step, 4);
        assert_eq!(fs::read_dir(d.join(CHECKPOINTS)).unwrap().count(), 3, "step-3, step-4, latest");
        // A damaged newest checkpoint is skipped, with the reason.
        fs::write(d.join("checkpoints/step-00000004/model.safetensors"), b"short").unwrap();
        let (c, skipped) = run.latest().unwrap();
        assert_eq!(c.step, 3);
        assert!(skipped[0].contains("model.safetensors has 5 bytes, the manifest says 10"), "{skipped:?}");
        drop(run);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn adapter_checkpoints_publish_the_adapter_pair() {
        let d = tmp("adapter");
        let run = RunDir::create(&d).unwrap();
        run.save(1, 2, |t| write_with(t, 1, &[7; 6], MODEL_FILES[1])).unwrap();
        assert_eq!(fs::read(d.join("adapter_model.safetensors")).unwrap(), vec![7u8; 6]);
        assert!(d.join("adapter_config.json").exists() && !d.join("model.safetensors").exists());
        // Half an adapter is not a checkpoint.
        let e = run
            .save(2, 2, |t| {
                write_with(t, 2, &[8; 6], MODEL_FILES[1])?;
                fs::remove_file(t.join("adapter_model.safetensors")).map_err(io(t))
            })
            .unwrap_err();
        assert!(e.to_string().contains("adapter_model.safetensors"), "{e}");
        assert_eq!(run.latest().unwrap().0.step, 1);
        drop(run);
        fs::remove_dir_all(&d).unwrap();
    }

    /// A follower reads a locked run and removes nothing; it never writes.
    #[test]
    fn a_follower_reads_a_run_it_does_not_own() {
        let d = tmp("follow");
        let owner = RunDir::create(&d).unwrap();
        owner.save(3, 2, |t| write_all(t, 3, &[3; 10])).unwrap();
        fs::create_dir_all(d.join("checkpoints/.tmp-step-00000009-1")).unwrap();
        let f = RunDir::follow(&d);
        assert!(f.is_follower() && !owner.is_follower());
        assert_eq!(f.latest().unwrap().0.step, 3, "reads while the owner holds the lock");
        assert!(d.join("checkpoints/.tmp-step-00000009-1").exists(), "a follower removes nothing");
        let saved = std::panic::catch_unwind(|| {
            let _ = f.save(4, 2, |_| -> Result<(), RunDirError> { Ok(()) });
        });
        assert!(saved.is_err(), "a follower's save is a bug, and panics");
        drop(owner);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ownership_and_lock() {
        let d = tmp("own");
        let run = RunDir::create(&d).unwrap();
        // A second trainer on the same directory.
        let e = RunDir::open(&d).unwrap_err().to_string();
        assert!(e.contains("in use by another trainer") && e.contains(".lock"), "{e}");
        let e = RunDir::create(&d).unwrap_err().to_string();
        assert!(e.contains("already holds a training run") && e.contains("--resume"), "{e}");
        drop(run);
        // Released with the owner: reopening works and clears temporaries.
        fs::create_dir_all(d.join("checkpoints/.tmp-step-00000009-1")).unwrap();
        fs::write(d.join(".model.safetensors.tmp-77"), b"x").unwrap();
        let run = RunDir::open(&d).unwrap();
        assert!(
            !d.join("checkpoints/.tmp-step-00000009-1").exists()
                && !d.join(".model.safetensors.tmp-77").exists()
        );
        assert!(matches!(run.latest(), Err(RunDirError::NoCheckpoint { .. })));
        drop(run);
        // A directory holding something else is refused, naming what it holds.
        let other = tmp("other");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("model.safetensors"), b"not ours").unwrap();
        let e = RunDir::create(&other).unwrap_err().to_string();
        assert!(e.contains("not a training run directory") && e.contains("`model.safetensors`"), "{e}");
        assert_eq!(fs::read(other.join("model.safetensors")).unwrap(), b"not ours");
        let e = RunDir::open(&other).unwrap_err().to_string();
        assert!(e.contains("no training run to resume"), "{e}");
        for p in [d, other] {
            fs::remove_dir_all(p).unwrap();
        }
    }
}
