//! Architecture invariants that can be checked mechanically, over `cargo metadata`.
//!
//! - `storage` stores bytes; it depends on no Kubernetes, HTTP or TLS crate.
//! - Leaf crates (every workspace member but the `k3rs` binary crate) never depend on each
//!   other: only `src/` wires them together.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

struct Graph {
    names: HashMap<String, String>,
    deps: HashMap<String, Vec<String>>,
    members: Vec<String>,
}

fn graph() -> Graph {
    let host = std::env::var("TARGET").unwrap_or_else(|_| {
        let out = Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc -vV");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
            .expect("host triple")
    });
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--filter-platform",
            &host,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names = m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut deps = HashMap::new();
    for n in m["resolve"]["nodes"].as_array().unwrap() {
        let normal: Vec<String> = n["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
            })
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        deps.insert(n["id"].as_str().unwrap().to_string(), normal);
    }
    let members = m["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    Graph {
        names,
        deps,
        members,
    }
}

impl Graph {
    fn id(&self, name: &str) -> String {
        self.names
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| panic!("no package {name}"))
    }

    /// Names of everything `id` depends on at run time, transitively.
    fn closure(&self, id: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![id.to_string()];
        while let Some(x) = stack.pop() {
            for d in self.deps.get(&x).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen.into_iter().map(|id| self.names[&id].clone()).collect()
    }
}

#[test]
fn storage_depends_on_no_kubernetes_http_or_tls_crate() {
    let g = graph();
    let closure = g.closure(&g.id("k3rs-storage"));
    let forbidden = [
        "k8s-openapi",
        "kube",
        "kube-client",
        "kube-core",
        "hyper",
        "hyper-util",
        "http",
        "http-body",
        "h2",
        "axum",
        "tower",
        "reqwest",
        "tonic",
        "rustls",
        "tokio-rustls",
        "oci-spec",
        "libcontainer",
        "netlink-packet-route",
        "rtnetlink",
    ];
    let found: Vec<_> = forbidden.iter().filter(|f| closure.contains(**f)).collect();
    assert!(found.is_empty(), "k3rs-storage depends on {found:?}");
    assert!(closure.contains("sled") && closure.contains("openraft"));
}

#[test]
fn leaf_crates_do_not_depend_on_each_other() {
    let g = graph();
    let leaves: Vec<&String> = g
        .members
        .iter()
        .filter(|id| g.names[*id] != "k3rs")
        .collect();
    assert!(!leaves.is_empty());
    let leaf_names: BTreeSet<String> = leaves.iter().map(|id| g.names[*id].clone()).collect();
    for id in &leaves {
        let name = &g.names[*id];
        let bad: Vec<_> = g
            .closure(id)
            .into_iter()
            .filter(|d| leaf_names.contains(d) && d != name)
            .collect();
        assert!(bad.is_empty(), "{name} depends on leaf crate(s) {bad:?}");
    }
}

#[test]
fn runtime_and_net_know_nothing_of_the_kubernetes_api() {
    let g = graph();
    for leaf in ["k3rs-runtime", "k3rs-net"] {
        let closure = g.closure(&g.id(leaf));
        let found: Vec<_> = ["k8s-openapi", "kube", "kube-client", "kube-core"]
            .iter()
            .filter(|f| closure.contains(**f))
            .collect();
        assert!(found.is_empty(), "{leaf} depends on {found:?}");
    }
}
