//! Output paths: a file the program writes is a regular file. A symlink is written through (its
//! target is replaced, the link stays); devices, FIFOs, sockets and directories are refused with
//! an error naming the path, so `-o /dev/full` or `-o some_dir` never replaces what is there.
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Most symlinks followed before giving up (a loop).
const MAX_LINKS: usize = 40;

/// The regular file `path` stands for: symlinks resolved (also dangling ones: the file is
/// created where the link points), refusing anything that exists and is not a regular file.
pub fn resolve_output(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", p.display())),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target =
                fs::read_link(&p).with_context(|| format!("reading link {}", p.display()))?;
            p = if target.is_absolute() {
                target
            } else {
                p.parent().unwrap_or(Path::new(".")).join(target)
            };
            continue;
        }
        if ft.is_file() {
            return Ok(p);
        }
        let what = if ft.is_dir() {
            "a directory".to_string()
        } else {
            kind_of(&ft)
        };
        if p == path {
            bail!(
                "refusing to write {}: it is {what}, not a regular file",
                path.display()
            );
        }
        bail!(
            "refusing to write {}: it points to {} which is {what}, not a regular file",
            path.display(),
            p.display()
        );
    }
    bail!(
        "refusing to write {}: more than {MAX_LINKS} symlinks (a loop?)",
        path.display()
    )
}

#[cfg(unix)]
fn kind_of(ft: &fs::FileType) -> String {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_char_device() {
        "a character device".into()
    } else if ft.is_block_device() {
        "a block device".into()
    } else if ft.is_fifo() {
        "a FIFO".into()
    } else if ft.is_socket() {
        "a socket".into()
    } else {
        "not a regular file".into()
    }
}

#[cfg(not(unix))]
fn kind_of(_: &fs::FileType) -> String {
    "not a regular file".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_missing_and_links_resolve_others_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.bin");
        assert_eq!(resolve_output(&f).unwrap(), f);
        fs::write(&f, b"x").unwrap();
        assert_eq!(resolve_output(&f).unwrap(), f);
        let e = format!("{:#}", resolve_output(d.path()).unwrap_err());
        assert!(e.contains("directory"), "{e}");
        #[cfg(unix)]
        {
            let l = d.path().join("link");
            std::os::unix::fs::symlink("a.bin", &l).unwrap();
            assert_eq!(resolve_output(&l).unwrap(), d.path().join("a.bin"));
            let e = format!("{:#}", resolve_output(Path::new("/dev/null")).unwrap_err());
            assert!(e.contains("character device"), "{e}");
            let dl = d.path().join("dev");
            std::os::unix::fs::symlink("/dev/null", &dl).unwrap();
            let e = format!("{:#}", resolve_output(&dl).unwrap_err());
            assert!(e.contains("points to /dev/null"), "{e}");
            let lp = d.path().join("loop");
            std::os::unix::fs::symlink("loop", &lp).unwrap();
            assert!(resolve_output(&lp).is_err());
        }
    }
}
