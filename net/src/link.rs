//! Netlink operations (rtnetlink): the bridge, veth pairs moved into pod namespaces, addresses,
//! routes, hairpin; and sysctls, each in a chosen network namespace (a netlink socket opened
//! from a short-lived thread that entered it).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::NetError;

fn nl(e: impl std::fmt::Display) -> NetError {
    NetError::Netlink(e.to_string())
}

fn enter(ns: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(ns)?;
    // SAFETY: setns on this (short-lived) thread with a namespace file we opened.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A netlink handle whose socket lives in `ns` (or the caller's namespace).
async fn handle_in(ns: Option<&Path>) -> Result<Handle, NetError> {
    let (conn, handle, _) = match ns {
        None => rtnetlink::new_connection().map_err(nl)?,
        Some(p) => {
            let p: PathBuf = p.to_path_buf();
            let rt = tokio::runtime::Handle::current();
            std::thread::spawn(move || {
                let _g = rt.enter();
                enter(&p)?;
                rtnetlink::new_connection()
            })
            .join()
            .map_err(|_| NetError::Netlink("netlink thread panicked".into()))?
            .map_err(|e| {
                NetError::Io(
                    format!(
                        "netlink socket in {}",
                        ns.map(|p| p.display().to_string()).unwrap_or_default()
                    ),
                    e,
                )
            })?
        }
    };
    tokio::spawn(conn);
    Ok(handle)
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(e)),
    }
}

fn exists_ok(r: Result<(), rtnetlink::Error>) -> Result<(), NetError> {
    match r {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(nl(e)),
    }
}

/// Writes a sysctl under /proc/sys in the namespace.
pub fn sysctl(ns: Option<&Path>, key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{key}");
    let value = value.to_string();
    let ns = ns.map(Path::to_path_buf);
    std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(p) = &ns {
            enter(p)?;
        }
        std::fs::write(&path, value)
    })
    .join()
    .map_err(|_| NetError::Invalid("sysctl thread panicked".into()))?
    .map_err(|e| NetError::Io(format!("sysctl {key}"), e))
}

pub async fn ensure_bridge(
    ns: Option<&Path>,
    name: &str,
    gw: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<(), NetError> {
    let h = handle_in(ns).await?;
    let idx = match index_of(&h, name).await? {
        Some(i) => i,
        None => {
            exists_ok(
                h.link()
                    .add(LinkBridge::new(name).mtu(mtu).build())
                    .execute()
                    .await,
            )?;
            index_of(&h, name)
                .await?
                .ok_or_else(|| NetError::Netlink(format!("bridge {name} vanished")))?
        }
    };
    exists_ok(h.address().add(idx, IpAddr::V4(gw), prefix).execute().await)?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(nl)?;
    Ok(())
}

pub async fn delete_link(ns: Option<&Path>, name: &str) -> Result<(), NetError> {
    let h = handle_in(ns).await?;
    if let Some(i) = index_of(&h, name).await? {
        match h.link().del(i).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(nl(e)),
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn attach(
    ns: Option<&Path>,
    bridge: &str,
    host_name: &str,
    pod_ns: &Path,
    ip: Ipv4Addr,
    prefix: u8,
    gw: Ipv4Addr,
    mtu: u32,
) -> Result<(), NetError> {
    let h = handle_in(ns).await?;
    let p = handle_in(Some(pod_ns)).await?;
    // Already attached (adoption after a restart): nothing to do.
    if index_of(&h, host_name).await?.is_some() && index_of(&p, "eth0").await?.is_some() {
        return Ok(());
    }
    if let Some(i) = index_of(&h, host_name).await? {
        let _ = h.link().del(i).execute().await;
    }
    let br = index_of(&h, bridge)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("bridge {bridge} is missing")))?;
    let peer = format!("p{}", &host_name[4..]);
    h.link()
        .add(LinkVeth::new(host_name, &peer).mtu(mtu).build())
        .execute()
        .await
        .map_err(nl)?;
    let hi = index_of(&h, host_name)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("{host_name} vanished")))?;
    let pi = index_of(&h, &peer)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("{peer} vanished")))?;
    h.link()
        .set(LinkUnspec::new_with_index(hi).controller(br).up().build())
        .execute()
        .await
        .map_err(nl)?;
    h.link()
        .set_port(LinkBridgePort::new(hi).hairpin(true).build())
        .execute()
        .await
        .map_err(nl)?;
    let f =
        std::fs::File::open(pod_ns).map_err(|e| NetError::Io(pod_ns.display().to_string(), e))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(pi)
                .setns_by_fd(f.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(nl)?;
    drop(f);
    // Inside the pod: eth0 with its address and default route, lo up.
    let pi = index_of(&p, &peer).await?.ok_or_else(|| {
        NetError::Netlink(format!("{peer} did not arrive in the pod's namespace"))
    })?;
    p.link()
        .set(
            LinkUnspec::new_with_index(pi)
                .name("eth0".to_string())
                .build(),
        )
        .execute()
        .await
        .map_err(nl)?;
    exists_ok(p.address().add(pi, IpAddr::V4(ip), prefix).execute().await)?;
    p.link()
        .set(LinkUnspec::new_with_index(pi).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl)?;
    if let Some(lo) = index_of(&p, "lo").await? {
        p.link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(nl)?;
    }
    exists_ok(
        p.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gw)
                    .output_interface(pi)
                    .build(),
            )
            .execute()
            .await,
    )?;
    Ok(())
}
