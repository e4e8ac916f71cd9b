//! The node's iptables rules as data (pure, unit-tested) and their application with one
//! `iptables-restore --noflush` batch: only k3rs's own chains are rewritten; the jumps into
//! them from the built-in chains are added once.

use std::net::Ipv4Addr;
use std::path::Path;

use super::NetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn name(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPortMapping {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub protocol: Protocol,
    pub pod_ip: Ipv4Addr,
    pub container_port: u16,
}

/// Jumps from the built-in chains into ours: (table, chain, rule spec).
pub const JUMPS: &[(&str, &str, &str)] = &[
    (
        "filter",
        "FORWARD",
        "-m comment --comment \"k3rs pod traffic\" -j K3RS-FORWARD",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment \"k3rs masquerade\" -j K3RS-POSTROUTING",
    ),
    (
        "nat",
        "PREROUTING",
        "-m comment --comment \"k3rs hostports\" -m addrtype --dst-type LOCAL -j K3RS-HOSTPORTS",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment \"k3rs hostports\" -m addrtype --dst-type LOCAL -j K3RS-HOSTPORTS",
    ),
];

/// The content of k3rs's chains.
pub fn rules(cluster: ipnet::Ipv4Net, host_ports: &[HostPortMapping]) -> String {
    let mut s = String::new();
    s.push_str("*filter\n:K3RS-FORWARD - [0:0]\n");
    s.push_str(&format!("-A K3RS-FORWARD -s {cluster} -j ACCEPT\n"));
    s.push_str(&format!("-A K3RS-FORWARD -d {cluster} -j ACCEPT\n"));
    s.push_str("COMMIT\n*nat\n:K3RS-POSTROUTING - [0:0]\n:K3RS-HOSTPORTS - [0:0]\n");
    for m in host_ports {
        let proto = m.protocol.name();
        let dst = m
            .host_ip
            .map(|ip| format!(" -d {ip}/32"))
            .unwrap_or_default();
        s.push_str(&format!(
            "-A K3RS-HOSTPORTS{dst} -p {proto} -m {proto} --dport {} -j DNAT --to-destination {}:{}\n",
            m.host_port, m.pod_ip, m.container_port
        ));
    }
    // A pod reaching itself through its host port must see the bridge as the source.
    for m in host_ports {
        let proto = m.protocol.name();
        s.push_str(&format!(
            "-A K3RS-POSTROUTING -s {ip}/32 -d {ip}/32 -p {proto} -m {proto} --dport {} -j MASQUERADE\n",
            m.container_port,
            ip = m.pod_ip
        ));
    }
    s.push_str(&format!(
        "-A K3RS-POSTROUTING -s {cluster} -d {cluster} -j RETURN\n"
    ));
    s.push_str(&format!(
        "-A K3RS-POSTROUTING -s {cluster} ! -d 224.0.0.0/4 -j MASQUERADE\n"
    ));
    s.push_str("COMMIT\n");
    s
}

fn command(netns: Option<&Path>, program: &str) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    if let Some(ns) = netns {
        let path = std::ffi::CString::new(ns.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: only open/setns/close between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }
    c
}

/// Applies the chains, adding the jumps that are missing.
pub async fn apply(netns: Option<&Path>, chains: &str) -> Result<(), NetError> {
    let netns = netns.map(Path::to_path_buf);
    let chains = chains.to_string();
    tokio::task::spawn_blocking(move || apply_blocking(netns.as_deref(), &chains))
        .await
        .map_err(|e| NetError::Iptables(e.to_string()))?
}

fn apply_blocking(netns: Option<&Path>, chains: &str) -> Result<(), NetError> {
    use std::io::Write;
    let save = command(netns, "iptables-save")
        .output()
        .map_err(|e| NetError::Io("running iptables-save (is iptables installed?)".into(), e))?;
    let current = String::from_utf8_lossy(&save.stdout).to_string();
    let mut batch = String::new();
    for table in ["filter", "nat"] {
        let start = format!("*{table}\n");
        let Some(i) = chains.find(&start) else {
            continue;
        };
        let body_end = chains[i..]
            .find("COMMIT\n")
            .map(|j| i + j)
            .unwrap_or(chains.len());
        batch.push_str(&chains[i..body_end]);
        for (t, chain, spec) in JUMPS {
            if *t != table {
                continue;
            }
            let want = format!("-A {chain} {}", spec.replace('"', ""));
            let present = current.lines().any(|l| l.replace('"', "") == want);
            if !present {
                batch.push_str(&format!("-I {chain} 1 {spec}\n"));
            }
        }
        batch.push_str("COMMIT\n");
    }
    let mut child = command(netns, "iptables-restore")
        .args(["-w", "5", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            NetError::Io(
                "running iptables-restore (is iptables installed?)".into(),
                e,
            )
        })?;
    child
        .stdin
        .take()
        .map(|mut s| s.write_all(batch.as_bytes()))
        .transpose()
        .map_err(|e| NetError::Io("iptables-restore stdin".into(), e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| NetError::Io("iptables-restore".into(), e))?;
    if !out.status.success() {
        return Err(NetError::Iptables(format!(
            "{}\n{batch}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "*filter\n:K3RS-FORWARD - [0:0]\n\
        -A K3RS-FORWARD -s 10.42.0.0/16 -j ACCEPT\n\
        -A K3RS-FORWARD -d 10.42.0.0/16 -j ACCEPT\n\
        COMMIT\n*nat\n:K3RS-POSTROUTING - [0:0]\n:K3RS-HOSTPORTS - [0:0]\n";
    const TAIL: &str = "-A K3RS-POSTROUTING -s 10.42.0.0/16 -d 10.42.0.0/16 -j RETURN\n\
        -A K3RS-POSTROUTING -s 10.42.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE\n\
        COMMIT\n";

    fn map(
        host_ip: Option<[u8; 4]>,
        port: u16,
        p: Protocol,
        pod: u8,
        cport: u16,
    ) -> HostPortMapping {
        HostPortMapping {
            host_ip: host_ip.map(Ipv4Addr::from),
            host_port: port,
            protocol: p,
            pod_ip: Ipv4Addr::new(10, 42, 1, pod),
            container_port: cport,
        }
    }

    #[test]
    fn rules_masquerade_leaving_traffic_and_map_host_ports() {
        let cases: Vec<(Vec<HostPortMapping>, &str)> = vec![
            (vec![], ""),
            (
                vec![map(None, 8080, Protocol::Tcp, 5, 80)],
                "-A K3RS-HOSTPORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.42.1.5:80\n\
                 -A K3RS-POSTROUTING -s 10.42.1.5/32 -d 10.42.1.5/32 -p tcp -m tcp --dport 80 -j MASQUERADE\n",
            ),
            (
                vec![
                    map(Some([192, 168, 1, 10]), 53, Protocol::Udp, 7, 5353),
                    map(None, 9000, Protocol::Sctp, 8, 9000),
                ],
                "-A K3RS-HOSTPORTS -d 192.168.1.10/32 -p udp -m udp --dport 53 -j DNAT --to-destination 10.42.1.7:5353\n\
                 -A K3RS-HOSTPORTS -p sctp -m sctp --dport 9000 -j DNAT --to-destination 10.42.1.8:9000\n\
                 -A K3RS-POSTROUTING -s 10.42.1.7/32 -d 10.42.1.7/32 -p udp -m udp --dport 5353 -j MASQUERADE\n\
                 -A K3RS-POSTROUTING -s 10.42.1.8/32 -d 10.42.1.8/32 -p sctp -m sctp --dport 9000 -j MASQUERADE\n",
            ),
        ];
        for (ports, middle) in cases {
            let got = rules("10.42.0.0/16".parse().unwrap(), &ports);
            assert_eq!(got, format!("{HEAD}{middle}{TAIL}"), "for {ports:?}");
        }
    }
}
