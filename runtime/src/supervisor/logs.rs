//! Container logs in the CRI format (`<RFC3339Nano> <stream> <P|F> <text>`), lines longer than
//! 16 KiB split with `P` tags, with size-based rotation (`<n>.log` → `<n>.log.<timestamp>`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAX_LINE: usize = 16 * 1024;
pub const MAX_SIZE: u64 = 10 << 20;
pub const MAX_FILES: usize = 5;

/// The rotated files of the log at `path` (`<path>.<timestamp>`), oldest first.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(base)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", base.to_string_lossy());
    let mut old: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    old.sort();
    old
}

pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    partial: [Vec<u8>; 2],
    max_size: u64,
    max_files: usize,
}

impl LogWriter {
    pub fn open(path: PathBuf) -> LogWriter {
        if let Some(p) = path.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
        LogWriter {
            path,
            file,
            size,
            partial: [Vec::new(), Vec::new()],
            max_size: MAX_SIZE,
            max_files: MAX_FILES,
        }
    }

    /// Rotation at `max_size` bytes keeping `max_files` files in all (0 = the defaults).
    pub fn with_limits(mut self, max_size: u64, max_files: usize) -> LogWriter {
        if max_size > 0 {
            self.max_size = max_size;
        }
        if max_files > 0 {
            self.max_files = max_files.max(2);
        }
        self
    }

    fn emit(&mut self, stream: usize, tag: char, text: &[u8]) {
        let name = if stream == 0 { "stdout" } else { "stderr" };
        let mut line = Vec::with_capacity(text.len() + 48);
        line.extend_from_slice(super::now_rfc3339_nanos().as_bytes());
        line.push(b' ');
        line.extend_from_slice(name.as_bytes());
        line.push(b' ');
        line.push(tag as u8);
        line.push(b' ');
        line.extend_from_slice(text);
        line.push(b'\n');
        if self.size + line.len() as u64 > self.max_size && self.size > 0 {
            self.rotate();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(&line).is_ok() {
                self.size += line.len() as u64;
            }
        }
    }

    fn rotate(&mut self) {
        let rotated = PathBuf::from(format!(
            "{}.{}",
            self.path.display(),
            super::now_rfc3339_nanos()
                .replace([':', '-'], "")
                .replace('.', "")
                .trim_end_matches('Z')
        ));
        let _ = std::fs::rename(&self.path, &rotated);
        // Keep the newest max_files - 1 rotated files.
        let mut old = rotated_files(&self.path);
        while old.len() > self.max_files - 1 {
            let _ = std::fs::remove_file(old.remove(0));
        }
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok();
        self.size = 0;
    }

    /// Feeds bytes read from a stream (0 stdout, 1 stderr).
    pub fn feed(&mut self, stream: usize, data: &[u8]) {
        let mut buf = std::mem::take(&mut self.partial[stream]);
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + pos;
            let mut s = start;
            while end - s > MAX_LINE {
                self.emit(stream, 'P', &buf[s..s + MAX_LINE]);
                s += MAX_LINE;
            }
            let chunk = buf[s..end].to_vec();
            self.emit(stream, 'F', &chunk);
            start = end + 1;
        }
        let mut rest = buf[start..].to_vec();
        while rest.len() > MAX_LINE {
            let head: Vec<u8> = rest.drain(..MAX_LINE).collect();
            self.emit(stream, 'P', &head);
        }
        self.partial[stream] = rest;
    }

    /// Writes what is left of an unterminated line when a stream ends.
    pub fn flush(&mut self, stream: usize) {
        let rest = std::mem::take(&mut self.partial[stream]);
        if !rest.is_empty() {
            self.emit(stream, 'F', &rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_tagged_and_long_ones_split() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0.log");
        let mut w = LogWriter::open(p.clone());
        w.feed(0, b"hello\nwor");
        w.feed(1, b"err\n");
        w.feed(0, b"ld\n");
        let long = vec![b'x'; MAX_LINE + 10];
        w.feed(0, &long);
        w.feed(0, b"\n");
        w.feed(0, b"tail");
        w.flush(0);
        let text = std::fs::read_to_string(&p).unwrap();
        let parts: Vec<(String, String, String)> = text
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.splitn(4, ' ').collect();
                (f[1].to_string(), f[2].to_string(), f[3].to_string())
            })
            .collect();
        assert_eq!(parts[0], ("stdout".into(), "F".into(), "hello".into()));
        assert_eq!(parts[1], ("stderr".into(), "F".into(), "err".into()));
        assert_eq!(parts[2], ("stdout".into(), "F".into(), "world".into()));
        assert_eq!(parts[3].1, "P");
        assert_eq!(parts[3].2.len(), MAX_LINE);
        assert_eq!(parts[4], ("stdout".into(), "F".into(), "x".repeat(10)));
        assert_eq!(parts[5], ("stdout".into(), "F".into(), "tail".into()));
    }

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0.log");
        let mut w = LogWriter::open(p.clone());
        w.max_size = 200;
        for i in 0..100 {
            w.feed(0, format!("line {i}\n").as_bytes());
        }
        let files = std::fs::read_dir(d.path()).unwrap().count();
        assert!(files <= MAX_FILES, "{files} files");
        assert!(std::fs::metadata(&p).unwrap().len() <= 200);
        assert!(std::fs::read_to_string(&p).unwrap().contains("line 99"));
    }
}
