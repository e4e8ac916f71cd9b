//! Node IPAM (kube-controller-manager's range allocator): every node gets a /24 `spec.podCIDR`
//! (and `spec.podCIDRs`) carved from `--cluster-cidr`. A range already on a node is kept (it is
//! immutable) and marked used, so that after a restart the used set is rebuilt from the nodes
//! before anything is handed out; a deleted node's range is released. Ranges are handed out
//! round-robin from after the last one given, as upstream's CIDR set does, so a range just
//! released is not reused at once.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::api::resources::ResourceDef;
use crate::api::status::ApiResult;
use crate::config::Cidr;
use crate::controllers::client::{is_terminating, name_of, Client};
use crate::controllers::events::Recorder;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

/// Upstream's default `--node-cidr-mask-size` for IPv4.
pub const NODE_MASK: u8 = 24;

/// The set of per-node ranges of one cluster network.
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    cluster: Cidr,
    mask: u8,
    /// How many node ranges the cluster network holds.
    count: u32,
    used: BTreeSet<u32>,
    /// Where the next search starts (after the last range handed out).
    next: u32,
}

impl RangeAllocator {
    /// Ranges of prefix length `mask` inside `cluster` (none when `cluster` is smaller).
    pub fn new(cluster: Cidr, mask: u8) -> RangeAllocator {
        let count = if mask < cluster.prefix || mask > 32 {
            0
        } else {
            1u32.checked_shl(u32::from(mask - cluster.prefix))
                .unwrap_or(u32::MAX)
        };
        RangeAllocator {
            cluster,
            mask,
            count,
            used: BTreeSet::new(),
            next: 0,
        }
    }

    fn shift(&self) -> u32 {
        32 - u32::from(self.mask)
    }

    /// The index of a range of this set, if `cidr` is one.
    fn index_of(&self, cidr: &str) -> Option<u32> {
        let c = Cidr::parse(cidr).ok()?;
        if c.prefix != self.mask || !self.cluster.contains(c.addr) {
            return None;
        }
        let idx = (u32::from(c.addr) - u32::from(self.cluster.addr))
            .checked_shr(self.shift())
            .unwrap_or(0);
        (idx < self.count).then_some(idx)
    }

    fn range(&self, idx: u32) -> String {
        let base = u32::from(self.cluster.addr) + idx.checked_shl(self.shift()).unwrap_or(0);
        format!("{}/{}", Ipv4Addr::from(base), self.mask)
    }

    /// Marks a range found on a node as used. False when it is not a range of this set (a
    /// node may keep such a range; it is just not tracked).
    pub fn occupy(&mut self, cidr: &str) -> bool {
        match self.index_of(cidr) {
            Some(i) => {
                self.used.insert(i);
                true
            }
            None => false,
        }
    }

    /// The next free range, marked used; `None` when the network is exhausted.
    pub fn allocate(&mut self) -> Option<String> {
        for n in 0..self.count {
            let idx = (self.next.wrapping_add(n)) % self.count;
            if self.used.insert(idx) {
                self.next = (idx + 1) % self.count;
                return Some(self.range(idx));
            }
        }
        None
    }

    /// Frees a range (its node is gone, or writing it failed).
    pub fn release(&mut self, cidr: &str) {
        if let Some(i) = self.index_of(cidr) {
            self.used.remove(&i);
        }
    }

    pub fn used(&self) -> usize {
        self.used.len()
    }
}

/// A node's pod range, if it has one.
pub fn pod_cidr(node: &Value) -> Option<&str> {
    node.pointer("/spec/podCIDR")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

struct Controller {
    nodes: Arc<Informer>,
    def: Arc<ResourceDef>,
    alloc: Mutex<RangeAllocator>,
    client: Client,
    recorder: Recorder,
}

impl Controller {
    async fn sync(&self, name: String) -> ApiResult<Option<Duration>> {
        let Some(node) = self.nodes.get(&name) else {
            return Ok(None);
        };
        if is_terminating(&node) {
            return Ok(None);
        }
        if let Some(c) = pod_cidr(&node) {
            self.alloc.lock().occupy(c);
            return Ok(None);
        }
        let Some(cidr) = self.alloc.lock().allocate() else {
            self.recorder.event(
                &node,
                "Normal",
                "CIDRNotAvailable",
                format!("Node {name} status is now: CIDRNotAvailable"),
            );
            return Ok(Some(Duration::from_secs(30)));
        };
        // Written with the observed resourceVersion as precondition: a node that got a range
        // meanwhile (a stale informer) conflicts instead of getting a second one.
        let mut n = (*node).clone();
        n["spec"]["podCIDR"] = json!(cidr);
        n["spec"]["podCIDRs"] = json!([cidr]);
        match self.client.update(&self.def, None, n).await {
            Ok(_) => {
                let used = self.alloc.lock().used();
                tracing::debug!(node = %name, cidr = %cidr, used, "pod CIDR allocated");
                Ok(None)
            }
            Err(e) => {
                self.alloc.lock().release(&cidr);
                if e.code == 404 {
                    return Ok(None);
                }
                Err(e)
            }
        }
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("node-ipam-controller");
    let def = client.def("", "v1", "nodes");
    let c = Arc::new(Controller {
        nodes: ctx.informers.get(&def),
        def,
        alloc: Mutex::new(RangeAllocator::new(ctx.st.config.cluster_cidr, NODE_MASK)),
        recorder: Recorder::new(client.clone(), "node-controller"),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut rx = c.nodes.subscribe();
            c.nodes.wait_synced().await;
            // Every range already handed out is marked used before anything is allocated.
            {
                let mut a = c.alloc.lock();
                for n in c.nodes.list() {
                    if let Some(cidr) = pod_cidr(&n) {
                        a.occupy(cidr);
                    }
                }
            }
            for n in c.nodes.list() {
                queue.add(name_of(&n).to_string());
            }
            while let Some(ch) = rx.recv().await {
                match &ch {
                    Change::Deleted(n) => {
                        if let Some(cidr) = pod_cidr(n) {
                            c.alloc.lock().release(cidr);
                        }
                    }
                    Change::Added(n) | Change::Updated { new: n, .. } => {
                        if let Some(cidr) = pod_cidr(n) {
                            c.alloc.lock().occupy(cidr);
                        } else {
                            queue.add(name_of(n).to_string());
                        }
                    }
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(
        queue,
        1,
        "node-ipam-controller",
        move |key| {
            let c = c2.clone();
            async move { c.sync(key).await }
        },
    ));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(cidr: &str) -> RangeAllocator {
        RangeAllocator::new(Cidr::parse(cidr).unwrap(), NODE_MASK)
    }

    #[test]
    fn ranges_are_consecutive_slash_24s_of_the_cluster_network() {
        let mut a = alloc("10.42.0.0/16");
        assert_eq!(a.allocate().as_deref(), Some("10.42.0.0/24"));
        assert_eq!(a.allocate().as_deref(), Some("10.42.1.0/24"));
        assert_eq!(a.allocate().as_deref(), Some("10.42.2.0/24"));
        assert_eq!(a.used(), 3);
    }

    #[test]
    fn ranges_found_on_nodes_are_never_handed_out_again() {
        // A restarted server rebuilds the used set from the nodes first.
        let mut a = alloc("10.42.0.0/16");
        assert!(a.occupy("10.42.0.0/24"));
        assert!(a.occupy("10.42.2.0/24"));
        let got: Vec<String> = (0..3).filter_map(|_| a.allocate()).collect();
        assert_eq!(got, ["10.42.1.0/24", "10.42.3.0/24", "10.42.4.0/24"]);
        // Ranges outside the set are kept by their node but not tracked.
        assert!(!a.occupy("10.99.0.0/24"));
        assert!(!a.occupy("10.42.5.0/25"));
        assert!(!a.occupy("garbage"));
    }

    #[test]
    fn released_ranges_come_back_after_the_others_and_exhaustion_is_reported() {
        let mut a = alloc("10.42.0.0/22"); // four /24s
        let all: Vec<String> = (0..4).filter_map(|_| a.allocate()).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(a.allocate(), None, "exhausted");
        a.release("10.42.1.0/24");
        assert_eq!(a.allocate().as_deref(), Some("10.42.1.0/24"));
        assert_eq!(a.allocate(), None);
        // Round-robin: after releasing two, the search goes on from the last one handed out.
        a.release("10.42.0.0/24");
        a.release("10.42.3.0/24");
        assert_eq!(a.allocate().as_deref(), Some("10.42.3.0/24"));
        assert_eq!(a.allocate().as_deref(), Some("10.42.0.0/24"));
    }

    #[test]
    fn a_cluster_network_smaller_than_a_node_range_has_none() {
        let mut a = alloc("10.42.0.0/26");
        assert_eq!(a.allocate(), None);
        let mut b = alloc("10.42.7.0/24");
        assert_eq!(b.allocate().as_deref(), Some("10.42.7.0/24"));
        assert_eq!(b.allocate(), None);
    }

    #[test]
    fn a_node_keeps_the_range_it_has() {
        let n = json!({"spec": {"podCIDR": "10.42.9.0/24", "podCIDRs": ["10.42.9.0/24"]}});
        assert_eq!(pod_cidr(&n), Some("10.42.9.0/24"));
        assert_eq!(pod_cidr(&json!({"spec": {"podCIDR": ""}})), None);
        assert_eq!(pod_cidr(&json!({"spec": {}})), None);
    }
}
