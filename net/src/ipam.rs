//! Host-local IPAM: one file per allocated address (named by the address, holding the pod
//! id), created with O_EXCL, so no address is handed out twice, even across restarts.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::NetError;

pub struct Ipam {
    dir: PathBuf,
    cidr: ipnet::Ipv4Net,
    lock: parking_lot::Mutex<()>,
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> NetError {
    let w = what.to_string();
    move |e| NetError::Io(w, e)
}

impl Ipam {
    pub fn open(base: &Path, cidr: ipnet::Ipv4Net) -> Result<Ipam, NetError> {
        let dir = base.join(cidr.to_string().replace('/', "_"));
        std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
        Ok(Ipam {
            dir,
            cidr: cidr.trunc(),
            lock: parking_lot::Mutex::new(()),
        })
    }

    /// The first host address: the bridge's.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    pub fn allocations(&self) -> Vec<(Ipv4Addr, String)> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if let Ok(ip) = e.file_name().to_string_lossy().parse::<Ipv4Addr>() {
                    let id = std::fs::read_to_string(e.path()).unwrap_or_default();
                    v.push((ip, id.trim().to_string()));
                }
            }
        }
        v.sort();
        v
    }

    /// The pod's address: the one it already holds, else the next free one after the last
    /// handed out (addresses rotate, so a released one is not reused at once).
    pub fn allocate(&self, id: &str) -> Result<Ipv4Addr, NetError> {
        let _g = self.lock.lock();
        if let Some((ip, _)) = self.allocations().into_iter().find(|(_, o)| o == id) {
            return Ok(ip);
        }
        let first = u32::from(self.cidr.network()) + 2;
        let last = u32::from(self.cidr.broadcast()) - 1;
        if last < first {
            return Err(NetError::Exhausted(self.cidr.to_string()));
        }
        let hint = std::fs::read_to_string(self.dir.join("last_reserved"))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|v| (first..=last).contains(v))
            .unwrap_or(last);
        let span = last - first + 1;
        for k in 1..=span {
            let cand = first + (hint - first + k) % span;
            let ip = Ipv4Addr::from(cand);
            let p = self.dir.join(ip.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
            {
                Ok(mut f) => {
                    f.write_all(id.as_bytes()).map_err(io(p.display()))?;
                    f.sync_all().ok();
                    let _ = std::fs::write(self.dir.join("last_reserved"), ip.to_string());
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(NetError::Io(p.display().to_string(), e)),
            }
        }
        Err(NetError::Exhausted(self.cidr.to_string()))
    }

    /// Frees every address held by `id`.
    pub fn release(&self, id: &str) -> Result<(), NetError> {
        let _g = self.lock.lock();
        for (ip, owner) in self.allocations() {
            if owner == id {
                let p = self.dir.join(ip.to_string());
                std::fs::remove_file(&p).map_err(io(p.display()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_stable_and_rotate() {
        let d = tempfile::tempdir().unwrap();
        let cidr: ipnet::Ipv4Net = "10.42.3.0/29".parse().unwrap();
        let ipam = Ipam::open(d.path(), cidr).unwrap();
        assert_eq!(ipam.gateway(), Ipv4Addr::new(10, 42, 3, 1));
        let a = ipam.allocate("a").unwrap();
        let b = ipam.allocate("b").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 42, 3, 2));
        assert_eq!(b, Ipv4Addr::new(10, 42, 3, 3));
        assert_eq!(ipam.allocate("a").unwrap(), a, "same pod, same address");
        // After a restart the allocations are still there.
        let again = Ipam::open(d.path(), cidr).unwrap();
        assert_eq!(again.allocate("b").unwrap(), b);
        again.release("a").unwrap();
        // Rotation: the next pod gets .4, not the just-freed .2.
        assert_eq!(again.allocate("c").unwrap(), Ipv4Addr::new(10, 42, 3, 4));
        for id in ["d", "e", "f"] {
            again.allocate(id).unwrap();
        }
        let err = again.allocate("g").unwrap_err();
        assert_eq!(err.to_string(), "no free address left in 10.42.3.0/29");
        let held: Vec<String> = again.allocations().into_iter().map(|(_, id)| id).collect();
        assert_eq!(held.len(), 5);
    }
}
