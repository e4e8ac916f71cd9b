//! Runs OCI images as containers: an image store (pull, air-gap import, layers unpacked once)
//! and a per-pod supervisor (`k3rs shim`) that drives youki's libcontainer. Knows nothing of
//! Pods or the Kubernetes API: plain descriptions in, plain state out.

pub mod supervisor;
/// The per-pod supervisor under the name the rest of the code uses.
pub use supervisor as shim;

pub mod image_store;
/// The image store under the name the rest of the code uses.
pub use image_store as images;
