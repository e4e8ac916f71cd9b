//! End-to-end tests of the API server: the built `k3rs server` on a free loopback port, driven
//! by the installed `kubectl` through the kubeconfig the server writes (one test binary).

mod cluster;
mod kube_client;
mod kubectl_basics;
mod kubectl_errors;
mod kubectl_writes;
