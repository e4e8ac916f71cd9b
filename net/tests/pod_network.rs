//! Pod networking for real, as root: each test builds a "node" in a network namespace of its own
//! (`k3rs-t-<random>`), plus pod namespaces, and everything is removed by Drop guards even when
//! the test panics. Nothing touches the machine's own network namespace.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k3rs_net::{HostPortMapping, NetError, PodNetwork, PodNetworkConfig, Protocol};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ (std::process::id() << 12) ^ COUNTER.fetch_add(1, Ordering::SeqCst).wrapping_mul(7919)
}

/// A network namespace created with `ip netns add`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("k3rs-t-{:08x}", unique());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }
    /// Runs a command inside the namespace; returns (success, stdout+stderr).
    fn exec(&self, argv: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("ip netns exec");
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
    fn ping(&self, ip: Ipv4Addr) -> (bool, String) {
        self.exec(&["busybox", "ping", "-c1", "-W3", &ip.to_string()])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A process started by a test, killed by PID on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

struct Node {
    ns: Netns,
    ipam: tempfile::TempDir,
    pod_cidr: ipnet::Ipv4Net,
}

impl Node {
    fn new(prefix: u8) -> Node {
        let u = unique();
        let pod_cidr = format!("10.{}.{}.0/{prefix}", 200 + (u % 50), (u >> 8) % 250)
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .trunc();
        Node {
            ns: Netns::new(),
            ipam: tempfile::tempdir().unwrap(),
            pod_cidr,
        }
    }
    fn config(&self) -> PodNetworkConfig {
        PodNetworkConfig {
            bridge: "k3rs0".into(),
            pod_cidr: self.pod_cidr,
            cluster_cidr: ipnet::Ipv4Net::new(self.pod_cidr.network(), 8)
                .unwrap()
                .trunc(),
            mtu: 1450,
            ipam_dir: self.ipam.path().to_path_buf(),
            host_netns: Some(self.ns.path()),
        }
    }
    async fn network(&self) -> PodNetwork {
        PodNetwork::new(self.config()).await.expect("pod network")
    }
    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.ns.name, "link", "show", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

// Needs root (network namespaces, netlink, iptables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_each_other_the_gateway_and_the_node() {
    let node = Node::new(24);
    let net = node.network().await;
    let gw = net.gateway();
    assert_eq!(u32::from(gw), u32::from(node.pod_cidr.network()) + 1);
    let (pa, pb) = (Netns::new(), Netns::new());
    let a = net.attach("pod-a", &pa.path()).await.unwrap();
    let b = net.attach("pod-b", &pb.path()).await.unwrap();
    assert_ne!(a, b);
    assert!(node.pod_cidr.contains(&a) && node.pod_cidr.contains(&b));

    // Inside the pod: eth0 with the address, the MTU and a default route via the gateway.
    let link = run(&["ip", "-n", &pa.name, "-o", "addr", "show", "eth0"]);
    assert!(
        link.contains(&format!("{a}/24")),
        "eth0 has no {a}/24: {link}"
    );
    let mtu = run(&["ip", "-n", &pa.name, "link", "show", "eth0"]);
    assert!(
        mtu.contains("mtu 1450") && mtu.contains("state UP"),
        "{mtu}"
    );
    let lo = run(&["ip", "-n", &pa.name, "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let routes = run(&["ip", "-n", &pa.name, "route"]);
    assert!(
        routes.contains(&format!("default via {gw} dev eth0")),
        "{routes}"
    );
    let br = run(&["ip", "-n", &node.ns.name, "-o", "addr", "show", "k3rs0"]);
    assert!(br.contains(&format!("{gw}/24")), "{br}");
    let (_, fwd) = node.ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(fwd.trim(), "1");
    // Hairpin mode is on for the pod's bridge port.
    let port = run(&[
        "ip",
        "-n",
        &node.ns.name,
        "-d",
        "link",
        "show",
        &k3rs_net::host_veth("pod-a"),
    ]);
    assert!(port.contains("hairpin on"), "{port}");

    for (from, to) in [(&pa, b), (&pb, a), (&pa, gw)] {
        let (ok, out) = from.ping(to);
        assert!(ok, "ping {to} from {}: {out}", from.name);
    }
    for to in [a, b] {
        let (ok, out) = node.ns.ping(to);
        assert!(ok, "node ping {to}: {out}");
    }
    // Attaching again is idempotent: same address, still reachable.
    assert_eq!(net.attach("pod-a", &pa.path()).await.unwrap(), a);
    let (ok, out) = pb.ping(a);
    assert!(ok, "after re-attach: {out}");
}

// Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_removes_the_veth_and_frees_the_address() {
    let node = Node::new(24);
    let net = node.network().await;
    let pod = Netns::new();
    let ip = net.attach("pod-x", &pod.path()).await.unwrap();
    let veth = k3rs_net::host_veth("pod-x");
    assert!(veth.len() <= 15);
    assert!(node.has_link(&veth));
    net.detach("pod-x").await.unwrap();
    assert!(!node.has_link(&veth), "{veth} still exists");
    assert!(net.allocations().is_empty(), "{:?}", net.allocations());
    let in_pod = run(&["ip", "-n", &pod.name, "link"]);
    assert!(!in_pod.contains("eth0"), "{in_pod}");
    net.detach("pod-x").await.unwrap();
    // The freed address can be used again later; a new pod gets an address.
    let other = Netns::new();
    let ip2 = net.attach("pod-y", &other.path()).await.unwrap();
    assert_ne!(ip2, net.gateway());
    assert!(node.pod_cidr.contains(&ip) && node.pod_cidr.contains(&ip2));
}

// Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_network_keeps_addresses_and_never_hands_one_out_twice() {
    let node = Node::new(24);
    let (pa, pb) = (Netns::new(), Netns::new());
    let a = {
        let net = node.network().await;
        net.attach("pod-a", &pa.path()).await.unwrap()
    };
    // A new PodNetwork over the same IPAM directory and node (the daemon restarted).
    let net = node.network().await;
    assert_eq!(net.attach("pod-a", &pa.path()).await.unwrap(), a);
    let b = net.attach("pod-b", &pb.path()).await.unwrap();
    assert_ne!(a, b);
    let (ok, out) = pb.ping(a);
    assert!(ok, "{out}");
    let held: HashSet<Ipv4Addr> = net.allocations().into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(held, HashSet::from([a, b]));
}

// Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_rules_live_in_the_node_namespace_only() {
    let node = Node::new(24);
    let net = node.network().await;
    let (ok, saved) = node.ns.exec(&["iptables-save"]);
    assert!(ok, "{saved}");
    let cluster = node.config().cluster_cidr;
    for want in [
        "-A FORWARD -m comment --comment \"k3rs pod traffic\" -j K3RS-FORWARD".to_string(),
        "-j K3RS-POSTROUTING".to_string(),
        format!("-A K3RS-POSTROUTING -s {cluster} ! -d 224.0.0.0/4 -j MASQUERADE"),
        format!("-A K3RS-FORWARD -s {cluster} -j ACCEPT"),
    ] {
        assert!(saved.contains(&want), "missing {want:?} in:\n{saved}");
    }
    // A second network object (restart) does not duplicate the jumps.
    drop(net);
    let _again = node.network().await;
    let (_, saved) = node.ns.exec(&["iptables-save"]);
    assert_eq!(saved.matches("-j K3RS-POSTROUTING").count(), 1, "{saved}");
    assert_eq!(saved.matches("-j K3RS-HOSTPORTS").count(), 2, "{saved}");
    // The machine's own namespace has none of this node's rules.
    let host = Command::new("iptables-save").output().unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(!host.contains(&cluster.to_string()), "{cluster} leaked");
}

// Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_reaches_a_listener_in_the_pod() {
    let node = Node::new(24);
    let net = node.network().await;
    let pod = Netns::new();
    let ip = net.attach("pod-web", &pod.path()).await.unwrap();
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "hello from the pod\n").unwrap();
    let _httpd = Proc(
        Command::new("ip")
            .args([
                "netns", "exec", &pod.name, "busybox", "httpd", "-f", "-p", "80", "-h",
            ])
            .arg(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    net.set_host_ports(&[HostPortMapping {
        host_ip: None,
        host_port: 8080,
        protocol: Protocol::Tcp,
        pod_ip: ip,
        container_port: 80,
    }])
    .await
    .unwrap();

    // A client outside the node, peered with it by a veth pair: traffic enters via PREROUTING.
    let client = Netns::new();
    run(&[
        "ip",
        "-n",
        &node.ns.name,
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "up1",
        "netns",
        &client.name,
    ]);
    run(&[
        "ip",
        "-n",
        &node.ns.name,
        "addr",
        "add",
        "192.168.251.1/30",
        "dev",
        "up0",
    ]);
    run(&["ip", "-n", &node.ns.name, "link", "set", "up0", "up"]);
    run(&[
        "ip",
        "-n",
        &client.name,
        "addr",
        "add",
        "192.168.251.2/30",
        "dev",
        "up1",
    ]);
    run(&["ip", "-n", &client.name, "link", "set", "up1", "up"]);

    let fetch = |ns: &Netns, url: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        for _ in 0..60 {
            // (busybox wget -T crashes here; bound it with timeout instead)
            let (ok, out) = ns.exec(&[
                "busybox", "timeout", "5", "busybox", "wget", "-q", "-O", "-", url,
            ]);
            if ok {
                return out;
            }
            last = out;
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let (_, rules) = node.ns.exec(&["iptables-save", "-c"]);
        panic!("{url} from {}: {last}\nrules:\n{rules}", ns.name);
    };
    assert_eq!(
        fetch(&client, "http://192.168.251.1:8080/index.html"),
        "hello from the pod\n"
    );
    // From the node itself (OUTPUT chain), to one of its own addresses.
    let gw = net.gateway();
    assert_eq!(
        fetch(&node.ns, &format!("http://{gw}:8080/index.html")),
        "hello from the pod\n"
    );
    // Hairpin: the pod reaches itself through the host port.
    assert_eq!(
        fetch(&pod, "http://192.168.251.1:8080/index.html"),
        "hello from the pod\n"
    );

    // Clearing the table removes the mapping.
    net.set_host_ports(&[]).await.unwrap();
    let (_, saved) = node.ns.exec(&["iptables-save", "-t", "nat"]);
    assert!(!saved.contains("--dport 8080"), "{saved}");
}

// Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_stale_frees_addresses_of_gone_pods() {
    let node = Node::new(24);
    let net = node.network().await;
    let (pa, pb) = (Netns::new(), Netns::new());
    let a = net.attach("live", &pa.path()).await.unwrap();
    net.attach("gone", &pb.path()).await.unwrap();
    let released = net
        .release_stale(&HashSet::from(["live".to_string()]))
        .await
        .unwrap();
    assert_eq!(released, 1);
    assert_eq!(net.allocations(), vec![(a, "live".to_string())]);
    assert!(!node.has_link(&k3rs_net::host_veth("gone")));
    assert!(node.has_link(&k3rs_net::host_veth("live")));
}

// Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_range_is_a_clear_error_and_leaves_nothing_behind() {
    // A /29: network, gateway and broadcast are never handed out, leaving five addresses.
    let node = Node::new(29);
    let net = node.network().await;
    let pods: Vec<Netns> = (0..6).map(|_| Netns::new()).collect();
    let mut ips = HashSet::new();
    for (i, p) in pods.iter().take(5).enumerate() {
        ips.insert(net.attach(&format!("p{i}"), &p.path()).await.unwrap());
    }
    assert_eq!(ips.len(), 5);
    assert!(!ips.contains(&net.gateway()));
    let err = net.attach("p5", &pods[5].path()).await.unwrap_err();
    assert!(matches!(err, NetError::Exhausted(_)), "{err}");
    assert!(err.to_string().contains("no free address"), "{err}");
    assert!(!node.has_link(&k3rs_net::host_veth("p5")));
}
