//! Images on a real node: a pull from a local registry (Debian's docker-registry, with basic
//! auth, inside the node's network namespace) through an imagePullSecret, and a bad image
//! that shows ErrImagePull then ImagePullBackOff with the registry's message.

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::node::Node;

const T: Duration = Duration::from_secs(90);

#[test]
fn a_bad_image_gives_err_image_pull_then_image_pull_back_off() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: badimg}
spec:
  containers:
  - name: main
    image: 127.0.0.1:1/nosuch/image:1.0
"#,
    );
    n.wait_for("ErrImagePull", T, || {
        n.pod_field(
            "badimg",
            "{.status.containerStatuses[0].state.waiting.reason}",
        ) == "ErrImagePull"
    });
    let msg = n.pod_field(
        "badimg",
        "{.status.containerStatuses[0].state.waiting.message}",
    );
    assert!(
        msg.starts_with("Failed to pull image \"127.0.0.1:1/nosuch/image:1.0\": "),
        "{msg}"
    );
    n.wait_for("ImagePullBackOff", T, || {
        n.pod_field(
            "badimg",
            "{.status.containerStatuses[0].state.waiting.reason}",
        ) == "ImagePullBackOff"
    });
    assert_eq!(
        n.pod_field(
            "badimg",
            "{.status.containerStatuses[0].state.waiting.message}"
        ),
        "Back-off pulling image \"127.0.0.1:1/nosuch/image:1.0\""
    );
    let events = n.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=badimg",
    ]);
    assert!(events.contains("Failed to pull image"), "{events}");
    assert!(events.contains("Back-off pulling image"), "{events}");
}

struct Registry {
    child: Child,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(n: &Node, port: u16) -> Registry {
    let dir = n.dir.path().join("registry");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", "puller", "pullpass"])
        .output()
        .expect("htpasswd (apache2-utils)");
    assert!(out.status.success());
    std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
    std::fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd: {{realm: k3rs-test, path: {}}}\n",
            dir.join("data").display(),
            dir.join("htpasswd").display()
        ),
    )
    .unwrap();
    let child = n
        .cmd("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
        .spawn()
        .expect("starting docker-registry");
    let reg = Registry { child };
    n.wait_for("the registry", T, || {
        n.fetch(&format!("http://127.0.0.1:{port}/")).is_some()
    });
    reg
}

#[test]
fn a_pull_from_a_local_registry_with_auth() {
    let n = Node::start();
    let port = 5123;
    let _reg = start_registry(&n, port);
    // Push the test image with the operator CLI (inside the node's namespace).
    let archive = crate::node::test_images().join("busybox.tar");
    let push = n
        .cmd(env!("CARGO_BIN_EXE_k3rs"))
        .args([
            "images",
            "push",
            "--plain-http",
            "--username",
            "puller",
            "--password",
            "pullpass",
        ])
        .arg(&archive)
        .arg(format!("127.0.0.1:{port}/test/busybox:v1"))
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "k3rs images push: {}",
        String::from_utf8_lossy(&push.stderr)
    );
    // Plain HTTP for this registry, as registries.yaml says.
    std::fs::write(
        n.dir.path().join("registries.yaml"),
        format!("mirrors:\n  \"127.0.0.1:{port}\":\n    endpoint: [\"http://127.0.0.1:{port}\"]\n"),
    )
    .unwrap();
    // The agent reads registries.yaml at start.
    let mut n = n;
    n.stop();
    n.boot();
    n.wait_node_ready();
    // Without credentials: the registry's refusal is the message.
    n.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: noauth}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: 127.0.0.1:{port}/test/busybox:v1
    command: ["true"]
"#
    ));
    n.wait_for("ErrImagePull without credentials", T, || {
        let r = n.pod_field(
            "noauth",
            "{.status.containerStatuses[0].state.waiting.reason}",
        );
        r == "ErrImagePull" || r == "ImagePullBackOff"
    });
    let events = n.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=noauth",
        "-o",
        "custom-columns=M:.message",
    ]);
    let lower = events.to_lowercase();
    assert!(
        lower.contains("authoriz") || lower.contains("401"),
        "{events}"
    );
    n.ok(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server=127.0.0.1:{port}"),
        "--docker-username=puller",
        "--docker-password=pullpass",
    ]);
    n.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: withauth}}
spec:
  restartPolicy: Never
  imagePullSecrets: [{{name: regcred}}]
  containers:
  - name: main
    image: 127.0.0.1:{port}/test/busybox:v1
    command: ["sh", "-c", "echo pulled-and-ran"]
"#
    ));
    n.wait_phase("withauth", "Succeeded", T);
    let image_id = n.pod_field("withauth", "{.status.containerStatuses[0].imageID}");
    assert!(
        image_id.starts_with(&format!("127.0.0.1:{port}/test/busybox@sha256:")),
        "{image_id}"
    );
    // The node lists the pulled image with its next status update.
    n.wait_for("the node's image list", T, || {
        n.jsonpath(&["node", &n.name], "{.status.images[*].names}")
            .contains(&format!("127.0.0.1:{port}/test/busybox:v1"))
    });
}
