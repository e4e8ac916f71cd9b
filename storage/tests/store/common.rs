//! Helpers shared by the store tests.

use std::path::Path;

/// A temporary directory removed when dropped.
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        TestDir(
            tempfile::Builder::new()
                .prefix(&format!("k3rs-{name}-"))
                .tempdir()
                .expect("creating a temporary directory"),
        )
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}
