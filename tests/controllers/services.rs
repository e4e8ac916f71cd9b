//! Services: ClusterIP and NodePort allocation (conflicts refused with upstream's messages,
//! released on deletion), the `kubernetes` Service, and Endpoints/EndpointSlices following the
//! pods a Service selects, through kubectl as a user would.

use std::time::Duration;

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

const LONG: Duration = Duration::from_secs(90);

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: c
        image: nginx
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// Endpoint addresses of the Service's slices (managed by the controller) as
/// `ip ready` lines, and the number of slices.
fn slice_view(c: &Cluster, svc: &str) -> (Vec<String>, usize) {
    let sel = format!("kubernetes.io/service-name={svc},endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io");
    let out = jsonpath(
        c,
        &["endpointslices", "-l", &sel],
        r#"{range .items[*]}{"slice\n"}{range .endpoints[*]}{.addresses[0]} {.conditions.ready}{"\n"}{end}{end}"#,
    );
    let slices = out.lines().filter(|l| *l == "slice").count();
    let mut eps: Vec<String> = out
        .lines()
        .filter(|l| *l != "slice")
        .map(str::to_string)
        .collect();
    eps.sort();
    (eps, slices)
}

fn ready_ips(c: &Cluster, svc: &str) -> Vec<String> {
    let mut v: Vec<String> = jsonpath(
        c,
        &["endpoints", svc],
        r#"{range .subsets[*].addresses[*]}{.ip}{"\n"}{end}"#,
    )
    .lines()
    .map(str::to_string)
    .collect();
    v.sort();
    v
}

fn pod_ips(c: &Cluster, label: &str) -> Vec<String> {
    let mut v: Vec<String> = jsonpath(
        c,
        &["pods", "-l", label, "--field-selector=status.phase=Running"],
        r#"{range .items[*]}{.status.podIP}{"\n"}{end}"#,
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(str::to_string)
    .collect();
    v.sort();
    v
}

/// Waits until the Service's Endpoints and slices show exactly `n` ready pods, all of the
/// running pods of `app=web`.
fn wait_endpoints(c: &Cluster, n: usize) {
    wait_for(c, &format!("{n} ready endpoints of web"), LONG, || {
        let ips = pod_ips(c, "app=web");
        if ips.len() != n {
            return false;
        }
        let (eps, _) = slice_view(c, "web");
        let want: Vec<String> = ips.iter().map(|ip| format!("{ip} true")).collect();
        ready_ips(c, "web") == ips && eps == want
    });
}

#[test]
fn a_service_gets_a_cluster_ip_and_node_port_and_its_endpoints_follow_the_pods() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1", "n2"], &[]);

    // The kubernetes Service, as upstream shows it.
    let out = c.ok(&["get", "svc", "kubernetes"]);
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["kubernetes", "ClusterIP", "10.43.0.1", "<none>", "443/TCP"],
        "{out}"
    );
    assert_eq!(
        jsonpath(
            &c,
            &["endpoints", "kubernetes"],
            "{.subsets[0].ports[0].name} {.subsets[0].ports[0].port}"
        ),
        format!("https {}", c.port)
    );
    let ep_ip = jsonpath(
        &c,
        &["endpoints", "kubernetes"],
        "{.subsets[0].addresses[0].ip}",
    );
    assert!(!ep_ip.is_empty());
    let out = c.ok(&["get", "endpoints", "kubernetes"]);
    assert!(out.contains(&format!("{ep_ip}:{}", c.port)), "{out}");
    assert_eq!(
        jsonpath(
            &c,
            &["endpointslice", "kubernetes"],
            "{.endpoints[0].addresses[0]}"
        ),
        ep_ip
    );

    c.ok_stdin(&["apply", "-f", "-"], WEB);
    let ip = jsonpath(&c, &["svc", "web"], "{.spec.clusterIP}");
    assert!(ip.starts_with("10.43."), "{ip}");
    assert!(ip != "10.43.0.1" && ip != "10.43.0.10", "{ip} is reserved");
    assert_eq!(
        jsonpath(&c, &["svc", "web"], "{.spec.clusterIPs}"),
        format!("[\"{ip}\"]")
    );
    assert_eq!(
        jsonpath(
            &c,
            &["svc", "web"],
            "{.spec.ipFamilies} {.spec.ipFamilyPolicy}"
        ),
        "[\"IPv4\"] SingleStack"
    );
    let np: u16 = jsonpath(&c, &["svc", "web"], "{.spec.ports[0].nodePort}")
        .parse()
        .unwrap();
    assert!((30000..=32767).contains(&np), "{np}");
    let out = c.ok(&["get", "svc", "web"]);
    assert!(out.contains(&format!("80:{np}/TCP")), "{out}");

    // Named target port resolved from the pods' container ports.
    wait_endpoints(&c, 3);
    assert_eq!(
        jsonpath(&c, &["endpoints", "web"], "{.subsets[0].ports[0].port}"),
        "8080"
    );
    let sel = "kubernetes.io/service-name=web";
    assert_eq!(
        jsonpath(&c, &["endpointslices", "-l", sel], "{.items[0].ports[0].port} {.items[0].addressType} {.items[0].metadata.ownerReferences[0].kind}/{.items[0].metadata.ownerReferences[0].name}"),
        "8080 IPv4 Service/web"
    );
    assert!(jsonpath(
        &c,
        &["endpointslices", "-l", sel],
        "{.items[0].metadata.name}"
    )
    .starts_with("web-"));

    // An apply that leaves nodePort out keeps it.
    c.ok_stdin(&["apply", "-f", "-"], WEB);
    assert_eq!(
        jsonpath(&c, &["svc", "web"], "{.spec.ports[0].nodePort}"),
        np.to_string()
    );

    c.ok(&["scale", "deployment", "web", "--replicas=5"]);
    wait_endpoints(&c, 5);
    c.ok(&["scale", "deployment", "web", "--replicas=1"]);
    wait_endpoints(&c, 1);
    c.ok(&["scale", "deployment", "web", "--replicas=0"]);
    wait_for(&c, "no endpoints and one empty slice", LONG, || {
        let (eps, slices) = slice_view(&c, "web");
        ready_ips(&c, "web").is_empty() && eps.is_empty() && slices == 1
    });
    assert_eq!(jsonpath(&c, &["endpoints", "web"], "{.subsets}"), "");
}

#[test]
fn endpoints_of_250_pods_are_split_into_three_slices() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1", "n2", "n3"], &[]);
    c.ok_stdin(
        &["apply", "-f", "-"],
        &WEB.replace("replicas: 3", "replicas: 250"),
    );
    wait_for(
        &c,
        "250 ready endpoints in slices",
        Duration::from_secs(180),
        || {
            let (eps, _) = slice_view(&c, "web");
            eps.len() == 250 && eps.iter().all(|e| e.ends_with(" true"))
        },
    );
    let per_slice = jsonpath(
        &c,
        &["endpointslices", "-l", "kubernetes.io/service-name=web"],
        r#"{range .items[*]}{.metadata.generateName}{range .endpoints[*]}+{end}{"\n"}{end}"#,
    );
    let mut counts: Vec<usize> = per_slice
        .lines()
        .map(|l| {
            assert!(l.starts_with("web-"), "{l}");
            l.matches('+').count()
        })
        .collect();
    counts.sort();
    assert_eq!(counts, vec![50, 100, 100], "{per_slice}");
    let (_, slices) = slice_view(&c, "web");
    assert_eq!(slices, 3);
    // The Endpoints object holds them all.
    assert_eq!(ready_ips(&c, "web").len(), 250);
}

#[test]
fn requested_cluster_ips_and_node_ports_are_refused_when_taken_and_free_after_deletion() {
    let c = Cluster::start();
    c.ok(&[
        "create",
        "service",
        "clusterip",
        "a",
        "--tcp=80:8080",
        "--clusterip=10.43.0.50",
    ]);
    assert_eq!(
        jsonpath(&c, &["svc", "a"], "{.spec.clusterIP}"),
        "10.43.0.50"
    );

    let svc = |name: &str, extra: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: x}}\n  ports: [{{port: 80}}]\n{extra}")
    };
    let err = c.fails_stdin(
        &["apply", "-f", "-"],
        &svc("b", "  clusterIP: 10.43.0.50\n"),
    );
    assert!(
        err.contains(r#"The Service "b" is invalid: spec.clusterIPs: Invalid value: []string{"10.43.0.50"}: failed to allocate IP 10.43.0.50: provided IP is already allocated"#),
        "{err}"
    );
    let err = c.fails_stdin(&["apply", "-f", "-"], &svc("b", "  clusterIP: 10.99.0.5\n"));
    assert!(
        err.contains(r#"spec.clusterIPs: Invalid value: []string{"10.99.0.5"}: failed to allocate IP 10.99.0.5: the provided IP (10.99.0.5) is not in the valid range. The range of valid IPs is 10.43.0.0/16"#),
        "{err}"
    );
    // Addresses kept from automatic allocation may be asked for.
    c.ok_stdin(
        &["apply", "-f", "-"],
        &svc("dns", "  clusterIP: 10.43.0.10\n"),
    );

    // ClusterIPs may not change.
    let err = c.fails(&[
        "patch",
        "svc",
        "a",
        "-p",
        r#"{"spec":{"clusterIP":"10.43.0.51","clusterIPs":["10.43.0.51"]}}"#,
    ]);
    assert!(
        err.contains(
            r#"spec.clusterIPs[0]: Invalid value: []string{"10.43.0.51"}: may not change once set"#
        ),
        "{err}"
    );

    // NodePorts.
    c.ok(&[
        "create",
        "service",
        "nodeport",
        "np1",
        "--tcp=80:8080",
        "--node-port=30080",
    ]);
    let np = |name: &str, port: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  selector: {{app: x}}\n  ports: [{{port: 80, nodePort: {port}}}]\n")
    };
    let err = c.fails_stdin(&["apply", "-f", "-"], &np("np2", "30080"));
    assert!(
        err.contains(r#"The Service "np2" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"#),
        "{err}"
    );
    let err = c.fails_stdin(&["apply", "-f", "-"], &np("np2", "8080"));
    assert!(
        err.contains("spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the valid range. The range of valid ports is 30000-32767"),
        "{err}"
    );
    // Changing the type to ClusterIP releases the NodePort.
    c.ok(&[
        "patch",
        "svc",
        "np1",
        "-p",
        r#"{"spec":{"type":"ClusterIP"}}"#,
    ]);
    assert_eq!(
        jsonpath(&c, &["svc", "np1"], "{.spec.ports[0].nodePort}"),
        ""
    );
    c.ok_stdin(&["apply", "-f", "-"], &np("np2", "30080"));
    // Back to NodePort: a new one is allocated.
    c.ok(&[
        "patch",
        "svc",
        "np1",
        "-p",
        r#"{"spec":{"type":"NodePort"}}"#,
    ]);
    let again = jsonpath(&c, &["svc", "np1"], "{.spec.ports[0].nodePort}");
    assert!(!again.is_empty() && again != "30080", "{again}");

    // Deleting a Service releases its address.
    c.ok(&["delete", "svc", "a"]);
    c.ok_stdin(
        &["apply", "-f", "-"],
        &svc("b", "  clusterIP: 10.43.0.50\n"),
    );

    // Headless and ExternalName Services hold no address.
    c.ok_stdin(
        &["apply", "-f", "-"],
        &svc("headless", "  clusterIP: None\n"),
    );
    assert_eq!(
        jsonpath(&c, &["svc", "headless"], "{.spec.clusterIPs}"),
        r#"["None"]"#
    );
    c.ok(&[
        "create",
        "service",
        "externalname",
        "ext",
        "--external-name=example.com",
    ]);
    assert_eq!(jsonpath(&c, &["svc", "ext"], "{.spec.clusterIP}"), "");

    // A namespace's Services release their addresses when it goes.
    c.ok(&["create", "namespace", "doomed"]);
    c.ok(&[
        "-n",
        "doomed",
        "create",
        "service",
        "clusterip",
        "gone",
        "--tcp=80:80",
        "--clusterip=10.43.0.60",
    ]);
    c.ok(&["delete", "namespace", "doomed", "--timeout=60s"]);
    wait_for(&c, "10.43.0.60 to be free again", LONG, || {
        c.kubectl(&[
            "create",
            "service",
            "clusterip",
            "reuse",
            "--tcp=80:80",
            "--clusterip=10.43.0.60",
        ])
        .status
        .success()
    });
}

#[test]
fn user_endpoints_of_a_service_without_selector_are_mirrored_into_slices() {
    let c = Cluster::start();
    c.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: db}
subsets:
- addresses: [{ip: 192.0.2.10}, {ip: 192.0.2.11}]
  ports: [{name: pg, port: 5432}]
"#,
    );
    let sel = "kubernetes.io/service-name=db,endpointslice.kubernetes.io/managed-by=endpointslicemirroring-controller.k8s.io";
    wait_for(&c, "a mirrored slice", LONG, || {
        jsonpath(
            &c,
            &["endpointslices", "-l", sel],
            r#"{range .items[*].endpoints[*]}{.addresses[0]} {.conditions.ready}{"\n"}{end}"#,
        ) == "192.0.2.10 true\n192.0.2.11 true\n"
    });
    // The user's Endpoints stay as written (no controller rewrites them).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        jsonpath(&c, &["endpoints", "db"], "{.subsets[0].addresses[*].ip}"),
        "192.0.2.10 192.0.2.11"
    );
    c.ok(&["delete", "endpoints", "db"]);
    wait_for(&c, "the mirrored slice to go", LONG, || {
        jsonpath(
            &c,
            &["endpointslices", "-l", sel],
            "{.items[*].metadata.name}",
        )
        .is_empty()
    });
}
