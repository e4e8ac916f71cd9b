//! The store's data directory: format marker and single-process lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::OpenError;

/// Content of the `FORMAT` file of this build's stores.
pub(crate) const FORMAT: &str = "k3rs-store v1 (sled 0.34, openraft 0.9)";

/// An exclusive `flock` on `<dir>/LOCK`, held while the store is open.
pub(crate) struct DirLock {
    _file: File,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates or checks the directory, then locks it. Refuses a directory that holds something
/// other than a k3rs store, one of another format, or one locked by a running process.
pub(crate) fn prepare(dir: &Path) -> Result<DirLock, OpenError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let format_path = dir.join("FORMAT");
    let fresh = match std::fs::read_to_string(&format_path) {
        Ok(found) => {
            if found.trim_end() != FORMAT {
                return Err(OpenError::UnsupportedFormat {
                    path: dir.to_path_buf(),
                    found: found.trim_end().to_string(),
                    expected: FORMAT.to_string(),
                });
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A lock file alone is what an interrupted first start leaves.
            let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
            let foreign = entries.try_fold(false, |found, e| {
                let name = e?.file_name();
                Ok::<_, std::io::Error>(found || (name != "LOCK" && name != "FORMAT.tmp"))
            });
            if foreign.map_err(io(dir))? {
                return Err(OpenError::NotAStore {
                    path: dir.to_path_buf(),
                });
            }
            true
        }
        Err(e) => return Err(io(&format_path)(e)),
    };
    let lock_path = dir.join("LOCK");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            return Err(OpenError::Locked {
                path: dir.to_path_buf(),
                holder: s.trim().parse().ok(),
            });
        }
        return Err(io(&lock_path)(err));
    }
    file.set_len(0).map_err(io(&lock_path))?;
    file.rewind().map_err(io(&lock_path))?;
    write!(file, "{}", std::process::id()).map_err(io(&lock_path))?;
    if fresh {
        let tmp: PathBuf = dir.join("FORMAT.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        writeln!(f, "{FORMAT}").map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &format_path).map_err(io(&format_path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(DirLock { _file: file })
}
