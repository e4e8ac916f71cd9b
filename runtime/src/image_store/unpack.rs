//! Unpacks one layer into a directory for overlayfs: whiteouts (`.wh.<name>`) become 0:0
//! character devices, opaque markers (`.wh..wh..opq`) the `trusted.overlay.opaque` xattr;
//! entries may not escape the directory; the uncompressed stream must match the diff id.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::{io, ImageError};

struct Hashing<R> {
    inner: R,
    ctx: ring::digest::Context,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

/// A decompressing reader chosen by media type, or by magic bytes.
pub fn decompress(path: &Path, media_type: &str) -> Result<Box<dyn Read>, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io(path.display()))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io(path.display()))?;
    drop(f);
    let f = std::io::BufReader::new(std::fs::File::open(path).map_err(io(path.display()))?);
    let gz = media_type.ends_with("gzip") || (n >= 2 && magic[..2] == [0x1f, 0x8b]);
    let zst = media_type.ends_with("zstd") || (n >= 4 && magic == [0x28, 0xb5, 0x2f, 0xfd]);
    Ok(if gz {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else if zst {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(f)
                .map_err(|e| ImageError::Invalid(format!("{}: zstd: {e}", path.display())))?,
        )
    } else {
        Box::new(f)
    })
}

fn safe_rel(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// What an AUFS-style marker entry (`.wh.*`) means for overlayfs.
#[derive(Debug, PartialEq, Eq)]
enum Whiteout<'a> {
    /// `.wh..wh..opq`: the directory hides everything below it.
    Opaque,
    /// `.wh.<name>`: `<name>` is deleted (a 0:0 character device).
    Remove(&'a str),
    /// Other `.wh..wh.*` metadata (AUFS hard-link directories) and malformed names.
    Ignore,
}

fn whiteout_kind(name: &str) -> Option<Whiteout<'_>> {
    let rest = name.strip_prefix(".wh.")?;
    Some(if rest == ".wh..opq" {
        Whiteout::Opaque
    } else if rest.starts_with(".wh.") || rest.is_empty() || rest == "." || rest == ".." {
        Whiteout::Ignore
    } else {
        Whiteout::Remove(rest)
    })
}

fn mknod_whiteout(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
    // SAFETY: mknod on a path we own with a NUL-terminated name.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_opaque(dir: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: setxattr with NUL-terminated name and a 1-byte value we own.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The directory `rel` under `root` (canonical), created as needed: symlinks met on the way
/// are followed only while they stay inside `root`, so nothing outside is ever touched.
fn dir_inside(root: &Path, rel: &Path) -> std::io::Result<PathBuf> {
    let escapes = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} leads out of the layer", rel.display()),
        )
    };
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        let mut next = cur.join(c);
        match std::fs::symlink_metadata(&next) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&next)?;
            }
            Err(e) => return Err(e),
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                let real = next.canonicalize().map_err(|_| escapes())?;
                if !real.starts_with(root) || !real.is_dir() {
                    return Err(escapes());
                }
                next = real;
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a directory", next.display()),
                ))
            }
        }
        cur = next;
    }
    Ok(cur)
}

/// Removes whatever is at `p` (without following a symlink there).
fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn cstr(p: &Path) -> std::io::Result<std::ffi::CString> {
    Ok(std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?)
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A character or block device or a FIFO, with its owner, mode and mtime (tar-rs would write
/// these as empty regular files).
fn make_special(p: &Path, h: &tar::Header) -> std::io::Result<()> {
    let kind = match h.entry_type() {
        tar::EntryType::Char => libc::S_IFCHR,
        tar::EntryType::Block => libc::S_IFBLK,
        _ => libc::S_IFIFO,
    };
    let mode = h.mode()? & 0o7777;
    // FIFOs often carry blank device fields.
    let dev = if kind == libc::S_IFIFO {
        0
    } else {
        libc::makedev(
            h.device_major()?.unwrap_or(0),
            h.device_minor()?.unwrap_or(0),
        )
    };
    remove_any(p);
    let c = cstr(p)?;
    // SAFETY: plain syscalls on a NUL-terminated path we own; the timespec array outlives the call.
    unsafe {
        check(libc::mknod(c.as_ptr(), kind | mode, dev))?;
        check(libc::lchown(c.as_ptr(), h.uid()? as u32, h.gid()? as u32))?;
        check(libc::chmod(c.as_ptr(), mode))?;
        let t = libc::timespec {
            tv_sec: h.mtime()? as libc::time_t,
            tv_nsec: 0,
        };
        check(libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
    }
    Ok(())
}

pub fn unpack_layer(
    blob: &Path,
    media_type: &str,
    target: &Path,
    diff_id: &str,
) -> Result<(), ImageError> {
    std::fs::create_dir_all(target).map_err(io(target.display()))?;
    let root = target.canonicalize().map_err(io(target.display()))?;
    let reader = Hashing {
        inner: decompress(blob, media_type)?,
        ctx: ring::digest::Context::new(&ring::digest::SHA256),
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    let bad = |e: std::io::Error| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        ImageError::Invalid(format!("layer {diff_id}: {msg}"))
    };
    for entry in ar.entries().map_err(bad)? {
        let mut e = entry.map_err(bad)?;
        let path = e.path().map_err(bad)?.into_owned();
        let Some(rel) = safe_rel(&path) else {
            return Err(ImageError::Invalid(format!(
                "layer {diff_id}: entry {} escapes the layer",
                path.display()
            )));
        };
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let kind = e.header().entry_type();
        let special = matches!(
            kind,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
        );
        let marker = name.starts_with(".wh.");
        if !marker && !special {
            e.unpack_in(target).map_err(bad)?;
            continue;
        }
        let rel_parent = rel.parent().unwrap_or(Path::new(""));
        let parent = dir_inside(&root, rel_parent).map_err(|err| {
            ImageError::Invalid(format!("layer {diff_id}: entry {}: {err}", path.display()))
        })?;
        match whiteout_kind(&name) {
            Some(Whiteout::Opaque) => {
                set_opaque(&parent).map_err(io(format!("opaque {}", parent.display())))?;
            }
            Some(Whiteout::Remove(hidden)) => {
                let p = parent.join(hidden);
                remove_any(&p);
                mknod_whiteout(&p).map_err(io(format!("whiteout {}", p.display())))?;
            }
            Some(Whiteout::Ignore) => {}
            None => {
                let p = parent.join(&name);
                make_special(&p, e.header()).map_err(io(format!("device {}", p.display())))?;
            }
        }
    }
    let mut r = ar.into_inner();
    std::io::copy(&mut r, &mut std::io::sink()).map_err(bad)?;
    let got: String = r
        .ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if format!("sha256:{got}") != diff_id {
        return Err(ImageError::Invalid(format!(
            "layer content sha256:{got} does not match its diff id {diff_id}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_names_map_to_overlay_markers() {
        assert_eq!(whiteout_kind(".wh..wh..opq"), Some(Whiteout::Opaque));
        assert_eq!(whiteout_kind(".wh.gone"), Some(Whiteout::Remove("gone")));
        assert_eq!(
            whiteout_kind(".wh..hidden"),
            Some(Whiteout::Remove(".hidden"))
        );
        assert_eq!(whiteout_kind(".wh..wh.plnk"), Some(Whiteout::Ignore));
        assert_eq!(whiteout_kind(".wh."), Some(Whiteout::Ignore));
        assert_eq!(whiteout_kind(".wh.."), Some(Whiteout::Ignore));
        assert_eq!(whiteout_kind(".wh..."), Some(Whiteout::Ignore));
        assert_eq!(whiteout_kind("plain"), None);
        assert_eq!(whiteout_kind("x.wh.y"), None);
    }

    #[test]
    fn entry_paths_may_not_leave_the_layer() {
        assert_eq!(safe_rel(Path::new("./a/b")), Some(PathBuf::from("a/b")));
        assert_eq!(safe_rel(Path::new("a/../b")), None);
        assert_eq!(safe_rel(Path::new("/etc/passwd")), None);
    }

    #[test]
    fn directories_are_resolved_inside_the_layer() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink(d.path(), root.join("out")).unwrap();
        std::fs::write(root.join("file"), b"").unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(
            dir_inside(&root, Path::new("lib/x")).unwrap(),
            root.join("usr/lib/x")
        );
        assert!(root.join("usr/lib/x").is_dir());
        assert!(dir_inside(&root, Path::new("out/y")).is_err());
        assert!(!d.path().join("y").exists());
        assert!(dir_inside(&root, Path::new("file/z")).is_err());
        assert_eq!(dir_inside(&root, Path::new("")).unwrap(), root);
    }
}
