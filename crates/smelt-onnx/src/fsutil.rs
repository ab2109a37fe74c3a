//! File-system helpers: confining external data paths to the model's folder, and atomic writes.

use smelt_tensor::{bail, Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Checks that `rel` is a relative path made only of normal components.
pub(crate) fn check_relative(rel: &str, what: &str) -> Result<()> {
    let p = Path::new(rel);
    if rel.is_empty() {
        bail!(Invalid, "{what} is empty");
    }
    if p.is_absolute() || p.has_root() {
        bail!(
            Invalid,
            "{what} '{rel}' is absolute; it must be relative to the model's folder"
        );
    }
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                bail!(
                    Invalid,
                    "{what} '{rel}' contains '..'; it must stay inside the model's folder"
                )
            }
            Component::RootDir | Component::Prefix(_) => {
                bail!(
                    Invalid,
                    "{what} '{rel}' is absolute; it must be relative to the model's folder"
                )
            }
        }
    }
    Ok(())
}

/// Resolves `rel` under `base`, refusing anything that ends up outside `base` (including via
/// symlinks), so a model file cannot make smelt read arbitrary files.
pub(crate) fn resolve_inside(base: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    check_relative(rel, what)?;
    let canon_base = base
        .canonicalize()
        .map_err(|e| Error::io(format!("cannot resolve folder {}", base.display()), e))?;
    let joined = base.join(rel);
    let canon = joined
        .canonicalize()
        .map_err(|e| Error::io(format!("cannot open {what} {}", joined.display()), e))?;
    if !canon.starts_with(&canon_base) {
        bail!(
            Invalid,
            "{what} '{rel}' resolves to {}, outside the model's folder {}",
            canon.display(),
            canon_base.display()
        );
    }
    if !canon.is_file() {
        bail!(Invalid, "{what} '{rel}' is not a regular file");
    }
    Ok(canon)
}

/// The folder a file lives in ("." for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A file being written under a temporary name next to its destination. `commit` renames it
/// into place; dropping it uncommitted removes it, so failures leave no debris behind.
pub(crate) struct TempFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<std::io::BufWriter<File>>,
}

impl TempFile {
    pub(crate) fn create(dest: &Path) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Input(format!("{} is not a file path", dest.display())))?;
        let dir = parent_dir(dest);
        if !dir.is_dir() {
            bail!(
                Input,
                "cannot write {}: the folder {} does not exist",
                dest.display(),
                dir.display()
            );
        }
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&tmp)
            .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
        Ok(TempFile {
            tmp,
            dest: dest.to_path_buf(),
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let tmp = &self.tmp;
        match self.file.as_mut() {
            Some(f) => f
                .write_all(bytes)
                .map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e)),
            None => bail!(Invalid, "write to a closed file {}", tmp.display()),
        }
    }

    /// Flushes and syncs the data, leaving the file ready to be renamed.
    pub(crate) fn finish(&mut self) -> Result<()> {
        let tmp = &self.tmp;
        if let Some(f) = self.file.take() {
            let f = f.into_inner().map_err(|e| {
                Error::io(format!("cannot write {}", tmp.display()), e.into_error())
            })?;
            f.sync_all()
                .map_err(|e| Error::io(format!("cannot sync {}", tmp.display()), e))?;
        }
        Ok(())
    }

    pub(crate) fn commit(mut self) -> Result<()> {
        self.finish()?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            Error::io(
                format!(
                    "cannot rename {} to {}",
                    self.tmp.display(),
                    self.dest.display()
                ),
                e,
            )
        })?;
        // Nothing left to clean up.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `dest` atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut t = TempFile::create(dest)?;
    t.write_all(bytes)?;
    t.commit()
}
