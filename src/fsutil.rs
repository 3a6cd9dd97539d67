//! Atomic file output: write a temporary file beside the target, then rename.
//!
//! A reader never sees a half-written file, and an interrupted or failed write
//! leaves the previous file (or none) in place.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file being written under a temporary name beside its final path.
pub struct AtomicFile {
    target: PathBuf,
    temporary: Option<tempfile::NamedTempFile>,
}

impl AtomicFile {
    /// Starts writing `target` (its folder must exist).
    pub fn create(target: &Path) -> Result<Self> {
        let dir = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut builder = tempfile::Builder::new();
        builder.prefix(".nlp-partial-");
        // A temporary file is private (0600) by default; the output is an ordinary
        // file, readable as the umask allows.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
        let temporary = builder
            .tempfile_in(dir)
            .map_err(|e| Error::io(target, e))?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            temporary: Some(temporary),
        })
    }

    /// Gives the file its final name. Dropping without committing deletes it.
    pub fn commit(mut self) -> Result<()> {
        let temporary = self.temporary.take().expect("commit is called once");
        temporary
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(&self.target, e))?;
        temporary
            .persist(&self.target)
            .map_err(|e| Error::io(&self.target, e.error))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.temporary
            .as_mut()
            .expect("written before commit")
            .write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.temporary
            .as_mut()
            .expect("flushed before commit")
            .flush()
    }
}

/// Writes `bytes` to `target` atomically.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(target)?;
    file.write_all(bytes).map_err(|e| Error::io(target, e))?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.txt");
        {
            let mut file = AtomicFile::create(&target).unwrap();
            file.write_all(b"half").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn committed_file_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.txt");
        std::fs::write(&target, "old").unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn output_gets_the_permissions_of_an_ordinary_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ordinary = dir.path().join("ordinary.txt");
        std::fs::write(&ordinary, "x").unwrap();
        let target = dir.path().join("out.txt");
        write_atomic(&target, b"x").unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&target), mode(&ordinary));
    }
}
