//! The run folder: runs never overwrite each other, one live run per folder (a lock file), stale
//! temp files of killed saves removed, and `metrics.jsonl` / `evals.jsonl` cut back to the
//! resumed step so a resumed run's history has each step once.
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What a new run does when its folder already holds a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingRun {
    /// Refuse with an error that says how to resume or overwrite.
    Refuse,
    /// Replace the old run's files (`--overwrite`).
    Overwrite,
    /// Start a new numbered folder `run-NNN` next to the named one and point the named one (a
    /// symlink, e.g. `runs/latest`) at it.
    NewNumbered,
}

/// Files whose presence means a folder holds a run.
const RUN_FILES: [&str; 3] = ["checkpoint.safetensors", "metrics.jsonl", "summary.json"];

/// Name of the lock file in a run folder.
pub const LOCK_FILE: &str = ".lock";

/// A run folder held by this process (the lock is released when this is dropped).
#[derive(Debug)]
pub struct RunFolder {
    pub dir: PathBuf,
    _lock: File,
}

/// Whether `dir` holds (part of) a run.
pub fn holds_run(dir: &Path) -> bool {
    RUN_FILES.iter().any(|f| dir.join(f).exists())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Picks, creates and locks the folder of a run. `out` is the folder asked for; `resume` the
/// checkpoint a resumed run continues from.
pub fn open_run_folder(
    out: &Path,
    existing: ExistingRun,
    resume: Option<&Path>,
) -> Result<RunFolder> {
    let dir = match (resume, existing) {
        // A resume with the default folder continues in the checkpoint's own folder.
        (Some(ck), ExistingRun::NewNumbered) => ck
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        (Some(ck), ExistingRun::Refuse) => {
            let own = ck.parent().filter(|p| !p.as_os_str().is_empty());
            let own = own.unwrap_or(Path::new("."));
            if holds_run(out) && !same_dir(own, out) {
                bail!(
                    "run folder {} already holds another run than the checkpoint {} being resumed: \
                     pick another -o, or pass --overwrite to replace it",
                    out.display(),
                    ck.display()
                );
            }
            out.to_path_buf()
        }
        (Some(_), ExistingRun::Overwrite) | (None, ExistingRun::Overwrite) => out.to_path_buf(),
        (None, ExistingRun::Refuse) => {
            if holds_run(out) {
                bail!(
                    "run folder {} already holds a run: pass --resume {} to continue it, \
                     --overwrite to replace it, or choose another -o",
                    out.display(),
                    super::checkpoint_in(out).display()
                );
            }
            out.to_path_buf()
        }
        (None, ExistingRun::NewNumbered) => new_numbered(out)?,
    };
    fs::create_dir_all(&dir)
        .with_context(|| format!("creating the run folder {}", dir.display()))?;
    let lock = lock(&dir)?;
    remove_stale_temps(&dir)?;
    Ok(RunFolder { dir, _lock: lock })
}

/// Claims `parent/run-NNN` (the next free number) and points `link` at it.
fn new_numbered(link: &Path) -> Result<PathBuf> {
    let parent = link
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut n = 1 + fs::read_dir(parent)
        .with_context(|| format!("listing {}", parent.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("run-")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    let dir = loop {
        let d = parent.join(format!("run-{n:03}"));
        // create_dir (not _all) fails if another run claimed the number first.
        match fs::create_dir(&d) {
            Ok(()) => break d,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    };
    point_link(link, &dir)?;
    Ok(dir)
}

/// Makes `link` a symlink to `dir` (relative, atomically replacing an old link). A real folder
/// at `link` is left alone, with a warning.
fn point_link(link: &Path, dir: &Path) -> Result<()> {
    match fs::symlink_metadata(link) {
        Ok(m) if !m.file_type().is_symlink() => {
            eprintln!(
                "warning: {} is a real folder (an older run), so it is not repointed; this run \
                 goes to {}",
                link.display(),
                dir.display()
            );
            return Ok(());
        }
        _ => {}
    }
    #[cfg(unix)]
    {
        let target = dir.file_name().map(PathBuf::from).unwrap_or(dir.into());
        let tmp = link.with_file_name(format!(
            ".{}.link.tmp.{}",
            link.file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("latest"),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)
            .with_context(|| format!("creating the link {}", tmp.display()))?;
        fs::rename(&tmp, link)
            .with_context(|| format!("pointing {} at {}", link.display(), dir.display()))?;
    }
    #[cfg(not(unix))]
    eprintln!(
        "note: this run goes to {} ({} is not updated on this platform)",
        dir.display(),
        link.display()
    );
    Ok(())
}

/// Takes the folder's lock, or names the live run that holds it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another run is writing to {} (its lock {} is held{}): wait for it, or choose \
                 another -o",
                dir.display(),
                path.display(),
                match holder.trim() {
                    "" => String::new(),
                    pid => format!(" by process {pid}"),
                }
            );
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    f.set_len(0)?;
    write!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Removes temp files of saves that were killed (with the folder locked, none is live).
fn remove_stale_temps(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() && crate::checkpoint::is_temp_name(&p) {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            eprintln!(
                "removed {}, left by a save that was interrupted",
                p.display()
            );
        }
    }
    Ok(())
}

/// Keeps the lines of the JSON-lines file `path` whose `"step"` passes `keep` (lines that do not
/// parse, such as a half-written last line, go too), rewriting it atomically. Missing file: ok.
pub fn truncate_jsonl(path: &Path, keep: impl Fn(u64) -> bool) -> Result<usize> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines() {
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match step {
            Some(s) if keep(s) => {
                out.push_str(line);
                out.push('\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        crate::checkpoint::write_atomic(path, out.as_bytes())?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_into_a_run_folder_is_refused_and_numbered_runs_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("r");
        let a = open_run_folder(&out, ExistingRun::Refuse, None).unwrap();
        fs::write(out.join("metrics.jsonl"), "{}\n").unwrap();
        drop(a);
        let e = format!(
            "{:#}",
            open_run_folder(&out, ExistingRun::Refuse, None).unwrap_err()
        );
        assert!(
            e.contains("already holds a run") && e.contains("--resume"),
            "{e}"
        );
        open_run_folder(&out, ExistingRun::Overwrite, None).unwrap();

        let latest = d.path().join("runs").join("latest");
        let r1 = open_run_folder(&latest, ExistingRun::NewNumbered, None).unwrap();
        let r2 = open_run_folder(&latest, ExistingRun::NewNumbered, None).unwrap();
        assert_ne!(r1.dir, r2.dir);
        assert!(r2.dir.ends_with("run-002"), "{:?}", r2.dir);
        assert_eq!(
            latest.canonicalize().unwrap(),
            r2.dir.canonicalize().unwrap()
        );
    }

    #[test]
    fn a_live_run_holds_the_lock_and_stale_temps_go() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("r");
        let held = open_run_folder(&out, ExistingRun::Refuse, None).unwrap();
        let e = format!(
            "{:#}",
            open_run_folder(&out, ExistingRun::Overwrite, None).unwrap_err()
        );
        assert!(e.contains("another run is writing"), "{e}");
        drop(held);
        let stale = out.join(".checkpoint.safetensors.tmp.4242");
        fs::write(&stale, b"partial").unwrap();
        open_run_folder(&out, ExistingRun::Overwrite, None).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn truncation_keeps_earlier_steps_and_drops_partial_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.jsonl");
        fs::write(
            &p,
            "{\"step\":0}\n{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"ste",
        )
        .unwrap();
        assert_eq!(truncate_jsonl(&p, |s| s < 2).unwrap(), 3);
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\"step\":0}\n{\"step\":1}\n"
        );
    }
}
