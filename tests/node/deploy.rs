//! A Deployment of real pods: every replica Running and answering on its own pod IP from the
//! node.

use std::time::Duration;

use crate::node::Node;

#[test]
fn a_twenty_replica_deployment_answers_on_every_pod_ip() {
    let n = Node::start();
    // The default pull policy of :latest is Always: the air-gap image is used as imported.
    n.apply(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 20
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: httpd
        image: busybox
        command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"]
        ports: [{containerPort: 80}]
"#,
    );
    n.wait_for("20 available replicas", Duration::from_secs(180), || {
        n.jsonpath(&["deployment", "web"], "{.status.availableReplicas}") == "20"
    });
    let names = n.jsonpath(&["pods", "-l", "app=web"], "{.items[*].metadata.name}");
    let ips = n.jsonpath(&["pods", "-l", "app=web"], "{.items[*].status.podIP}");
    let names: Vec<&str> = names.split_whitespace().collect();
    let ips: Vec<&str> = ips.split_whitespace().collect();
    assert_eq!(ips.len(), 20);
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 20, "pod IPs not unique: {ips:?}");
    for (name, ip) in names.iter().zip(&ips) {
        assert!(ip.starts_with("10.42."), "{ip}");
        let mut got = None;
        for _ in 0..50 {
            got = n.fetch(&format!("http://{ip}/"));
            if got.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            got.as_deref().map(str::trim),
            Some(*name),
            "pod {name} at {ip}"
        );
    }
}
