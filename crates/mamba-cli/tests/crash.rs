//! What a killed trainer leaves: `mamba train` is SIGKILLed at random moments while it
//! checkpoints every step; after each kill the newest checkpoint must be complete and
//! self-consistent, and `--resume` must finish the run bit-identically to a run that was never
//! interrupted. Also: a second trainer on a directory in use is refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mamba_nn::checkpoint::TensorFile;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-crash-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A small generated corpus (no external data).
fn corpus(path: &Path) {
    let mut s = String::new();
    let mut x = 7u64;
    for i in 0..4000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s += &format!("{} + {} = {}\n", i % 97, (x >> 40) % 89, i % 97 + ((x >> 40) % 89) as usize);
    }
    std::fs::write(path, s).unwrap();
}

fn train_cmd(data: &Path, out: &Path, steps: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mamba"));
    c.args(["train", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--steps", steps])
        .args(["--d-model", "32", "--n-layer", "2", "--d-state", "8", "--batch-size", "4", "--seq-len", "64"])
        .args(["--eval-every", "1", "--threads", "1", "--seed", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// `mamba train --out OUT --resume` (with `--steps` when given).
fn resume(out: &Path, steps: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mamba"));
    c.args(["train", "--out", out.to_str().unwrap(), "--resume", "--threads", "1"]);
    if let Some(s) = steps {
        c.args(["--steps", s]);
    }
    c.output().expect("run mamba")
}

/// The step of the checkpoint `latest` names, after checking that the checkpoint's manifest,
/// trainer.json, directory name and file sizes agree and its safetensors files parse.
fn check_latest(out: &Path) -> Option<u64> {
    let ck = out.join("checkpoints");
    let name = std::fs::read_to_string(ck.join("latest")).ok()?;
    let dir = ck.join(name.trim());
    let step: u64 = name.trim().strip_prefix("step-").unwrap().parse().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["step"].as_u64(), Some(step), "{}: manifest step", dir.display());
    for f in manifest["files"].as_array().unwrap() {
        let (file, size) = (f[0].as_str().unwrap(), f[1].as_u64().unwrap());
        assert_eq!(std::fs::metadata(dir.join(file)).unwrap().len(), size, "{}/{file}", dir.display());
    }
    let trainer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(trainer["step"].as_u64(), Some(step), "{}: trainer.json step", dir.display());
    for f in ["model.safetensors", "optimizer.safetensors"] {
        TensorFile::open(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    Some(step)
}

#[test]
fn killed_training_resumes_bit_identically() {
    let base = tmp("base");
    std::fs::create_dir_all(&base).unwrap();
    let data = base.join("corpus.txt");
    corpus(&data);
    // The uninterrupted run, timed to place the kills.
    let straight = base.join("straight");
    let t0 = Instant::now();
    let o = train_cmd(&data, &straight, "30").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let duration = t0.elapsed();
    let want = std::fs::read(straight.join("model.safetensors")).unwrap();
    assert_eq!(check_latest(&straight), Some(30));

    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let (mut kills, mut attempts, mut early) = (0, 0, 0);
    while kills < 20 {
        attempts += 1;
        assert!(attempts <= 60, "only {kills} of {attempts} kills landed after a first checkpoint");
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let frac = 0.15 + 0.8 * (rng >> 11) as f64 / (1u64 << 53) as f64;
        let out = base.join(format!("kill-{attempts}"));
        let mut child = train_cmd(&data, &out, "30").spawn().unwrap();
        std::thread::sleep(duration.mul_f64(frac));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        let Some(step) = check_latest(&out) else {
            // Killed before its first checkpoint: resuming says so, naming the directory.
            let r = resume(&out, None);
            assert!(!r.status.success());
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(err.contains("no complete checkpoint"), "{err}");
            early += 1;
            continue;
        };
        if !finished {
            kills += 1;
        }
        let r = resume(&out, None);
        assert!(
            r.status.success(),
            "resume after a kill at step {step}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let got = std::fs::read(out.join("model.safetensors")).unwrap();
        assert!(got == want, "kill {attempts} (checkpoint at step {step}): the resumed run's model differs");
        assert_eq!(check_latest(&out), Some(30));
        // No temporaries are left behind.
        let stale: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(stale.is_empty(), "temporaries left: {stale:?}");
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!("{kills} kills mid-run, {early} before the first checkpoint, {attempts} attempts");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_second_trainer_on_a_directory_in_use_is_refused() {
    let base = tmp("lock");
    std::fs::create_dir_all(&base).unwrap();
    let data = base.join("corpus.txt");
    corpus(&data);
    let out = base.join("run");
    let mut child = train_cmd(&data, &out, "1000000").spawn().unwrap();
    let t0 = Instant::now();
    while check_latest(&out).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the first trainer wrote no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = resume(&out, Some("1"));
    let err = String::from_utf8_lossy(&second.stderr).into_owned();
    let fresh = train_cmd(&data, &out, "5").output().unwrap();
    child.kill().ok();
    child.wait().unwrap();
    assert!(!second.status.success() && err.contains("in use by another trainer"), "{err}");
    let err = String::from_utf8_lossy(&fresh.stderr);
    assert!(!fresh.status.success() && err.contains("already holds a training run"), "{err}");
    // Once the first is gone (its lock dies with it), the run resumes: with --steps 1 it is
    // already done, evaluates and checkpoints its step again, and exits.
    let r = resume(&out, Some("1"));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(check_latest(&out).is_some());
    let _ = std::fs::remove_dir_all(&base);
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_save_and_keeps_the_last_checkpoint() {
    let base = tmp("full");
    let mnt = base.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=900k", "tmpfs", mnt.to_str().unwrap()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root and mount permission)");
        return;
    }
    let _guard = Mount(mnt.clone());
    let data = base.join("corpus.txt");
    corpus(&data);
    let out = mnt.join("run");
    // Each checkpoint is about 0.36 MB: a third does not fit beside the two kept.
    let o = train_cmd(&data, &out, "1000").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "training on a full disk succeeded");
    assert!(err.contains("No space left on device"), "{err}");
    let step = check_latest(&out).expect("a complete checkpoint survives the full disk");
    assert!(step >= 1, "{err}");
    let stale: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(stale.is_empty(), "the failed checkpoint's temporaries were left: {stale:?}");
    assert_eq!(err.matches("No space left on device").count(), 1, "the cause once: {err}");
    drop(_guard);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn ctrl_c_checkpoints_and_says_how_to_resume() {
    let base = tmp("sigint");
    std::fs::create_dir_all(&base).unwrap();
    let data = base.join("corpus.txt");
    corpus(&data);
    let out = base.join("run");
    let child = train_cmd(&data, &out, "1000000").spawn().unwrap();
    let t0 = Instant::now();
    while check_latest(&out).is_none_or(|s| s < 3) {
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint written");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "a clean non-zero exit, not a signal: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let step: u64 = err
        .split("stopped at step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no step in: {err}"));
    assert!(err.contains(&format!("mamba train --out {} --resume", out.display())), "{err}");
    assert_eq!(check_latest(&out), Some(step), "the checkpoint of the step it stopped at");
    let r = resume(&out, Some(&(step + 2).to_string()));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(check_latest(&out), Some(step + 2));
    let _ = std::fs::remove_dir_all(&base);
}
