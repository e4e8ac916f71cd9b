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

pub fn unpack_layer(
    blob: &Path,
    media_type: &str,
    target: &Path,
    diff_id: &str,
) -> Result<(), ImageError> {
    std::fs::create_dir_all(target).map_err(io(target.display()))?;
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
        let parent = target.join(rel.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            std::fs::create_dir_all(&parent).map_err(io(parent.display()))?;
            set_opaque(&parent).map_err(io(format!("opaque {}", parent.display())))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            std::fs::create_dir_all(&parent).map_err(io(parent.display()))?;
            let p = parent.join(hidden);
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
            mknod_whiteout(&p).map_err(io(format!("whiteout {}", p.display())))?;
            continue;
        }
        e.unpack_in(target).map_err(bad)?;
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
