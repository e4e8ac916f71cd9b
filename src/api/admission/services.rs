//! Service admission: ClusterIPs from the service CIDR and NodePorts from the NodePort range,
//! as upstream's service REST allocators, with the allocations kept in the store (like
//! upstream's newer IPAddress objects): `/registry/k3rs/serviceips/<ip>` and
//! `/registry/k3rs/servicenodeports/<port>`, each holding the Service's `namespace/name`.
//!
//! A key is written in the Service's own write transaction with a compare that it is absent
//! (or still the stale key of the same name we read), so two Services can never hold one
//! address, whatever races. Removing a Service deletes its keys in the same transaction. A
//! repair pass ([`repair`], at start, periodically and soon after Services vanish) removes keys
//! whose Service is gone or no longer holds them, and restores keys Services lack.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use k3rs_storage::{
    Compare, DeleteRangeRequest, KeyRange, KeyValue, PutRequest, RangeRequest, TxnOp, TxnRequest,
};
use serde_json::{json, Value};

use super::TxnExtra;
use crate::api::status::{ApiError, ApiResult, Cause};
use crate::api::ApiState;
use crate::config::Cidr;

/// Allocation keys of ClusterIPs.
pub const IPS: &str = "/registry/k3rs/serviceips/";
/// Allocation keys of NodePorts.
pub const NODE_PORTS: &str = "/registry/k3rs/servicenodeports/";

pub fn ip_key(ip: Ipv4Addr) -> String {
    format!("{IPS}{ip}")
}

pub fn port_key(port: u16) -> String {
    format!("{NODE_PORTS}{port}")
}

fn ty(svc: &Value) -> &str {
    svc.pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
}

fn needs_cluster_ip(svc: &Value) -> bool {
    ty(svc) != "ExternalName"
}

fn needs_node_ports(svc: &Value) -> bool {
    matches!(ty(svc), "NodePort" | "LoadBalancer")
}

/// Whether ports without a nodePort get one (LoadBalancers may opt out).
fn allocates_node_ports(svc: &Value) -> bool {
    match ty(svc) {
        "NodePort" => true,
        "LoadBalancer" => {
            svc.pointer("/spec/allocateLoadBalancerNodePorts")
                .and_then(Value::as_bool)
                != Some(false)
        }
        _ => false,
    }
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn cluster_ips(svc: &Value) -> Vec<String> {
    let ips = str_list(svc.pointer("/spec/clusterIPs"));
    if ips.is_empty() {
        match svc.pointer("/spec/clusterIP").and_then(Value::as_str) {
            Some(ip) if !ip.is_empty() => vec![ip.to_string()],
            _ => vec![],
        }
    } else {
        ips
    }
}

fn node_ports(svc: &Value) -> Vec<u16> {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p["nodePort"].as_u64())
        .filter(|n| *n > 0 && *n <= 65535)
        .map(|n| n as u16)
        .collect()
}

/// Go's rendering of a `[]string` in field errors.
fn go_strings(v: &[String]) -> String {
    let q: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("[]string{{{}}}", q.join(", "))
}

fn invalid_list(field: &str, list: &[String], detail: &str) -> Cause {
    Cause::new(
        "FieldValueInvalid",
        field,
        format!("Invalid value: {}: {detail}", go_strings(list)),
    )
}

fn svc_name(svc: &Value) -> String {
    svc.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn holder(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// The usable addresses of a service CIDR (network and broadcast addresses excluded), with
/// upstream's split: automatic allocation prefers the upper band and leaves the lower one
/// (where fixed addresses such as the DNS Service's live) for requests.
#[derive(Clone, Copy, Debug)]
pub struct IpPool {
    first: u32,
    size: u32,
    offset: u32,
}

impl IpPool {
    pub fn new(cidr: &Cidr) -> IpPool {
        let total = 1u64 << (32 - u32::from(cidr.prefix));
        let size = total.saturating_sub(2) as u32;
        // Upstream's calculateRangeOffset: size/16 clamped to [16, 256] (0 for tiny ranges).
        let offset = if total < 16 {
            0
        } else {
            (total / 16).clamp(16, 256) as u32
        };
        IpPool {
            first: u32::from(cidr.addr) + 1,
            size,
            offset: offset.min(size),
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let i = u32::from(ip);
        i >= self.first && i - self.first < self.size
    }

    /// A free address (not in `used`, not `reserved`), starting the scan at a random point of
    /// the upper band, then of the lower band.
    pub fn choose(
        &self,
        used: &HashSet<Ipv4Addr>,
        reserved: &[Ipv4Addr],
        rnd: u64,
    ) -> Option<Ipv4Addr> {
        let free = |i: u32| {
            let ip = Ipv4Addr::from(self.first + i);
            (!used.contains(&ip) && !reserved.contains(&ip)).then_some(ip)
        };
        scan(self.offset, self.size, rnd, &free).or_else(|| scan(0, self.offset, rnd, &free))
    }
}

/// The first `f(i)` that is `Some` for `i` in `lo..hi`, scanning from a point chosen by `rnd`.
fn scan<T>(lo: u32, hi: u32, rnd: u64, f: &impl Fn(u32) -> Option<T>) -> Option<T> {
    if hi <= lo {
        return None;
    }
    let n = hi - lo;
    let start = (rnd % u64::from(n)) as u32;
    (0..n).find_map(|k| f(lo + (start + k) % n))
}

/// The NodePort range (inclusive) with upstream's bands (size/32 clamped to [16, 128]).
#[derive(Clone, Copy, Debug)]
pub struct PortPool {
    lo: u16,
    hi: u16,
}

impl PortPool {
    pub fn new(range: (u16, u16)) -> PortPool {
        PortPool {
            lo: range.0,
            hi: range.1,
        }
    }

    pub fn contains(&self, p: u16) -> bool {
        (self.lo..=self.hi).contains(&p)
    }

    pub fn choose(&self, used: &HashSet<u16>, rnd: u64) -> Option<u16> {
        let size = u32::from(self.hi) - u32::from(self.lo) + 1;
        let offset = if size < 16 {
            0
        } else {
            (size / 32).clamp(16, 128)
        };
        let free = |i: u32| {
            let p = (u32::from(self.lo) + i) as u16;
            (!used.contains(&p)).then_some(p)
        };
        scan(offset, size, rnd, &free).or_else(|| scan(0, offset, rnd, &free))
    }

    fn describe(&self) -> String {
        format!("{}-{}", self.lo, self.hi)
    }
}

/// The allocation being built for one write: keys read, keys claimed and released.
struct Alloc<'a> {
    st: &'a ApiState,
    me: String,
    extra: TxnExtra,
    used_ips: Option<HashSet<Ipv4Addr>>,
    used_ports: Option<HashSet<u16>>,
    claimed_ports: BTreeSet<u16>,
}

impl<'a> Alloc<'a> {
    fn new(st: &'a ApiState, ns: &str, name: &str) -> Alloc<'a> {
        Alloc {
            st,
            me: holder(ns, name),
            extra: TxnExtra::default(),
            used_ips: None,
            used_ports: None,
            claimed_ports: BTreeSet::new(),
        }
    }

    async fn keys(&self, prefix: &str) -> ApiResult<Vec<KeyValue>> {
        Ok(self
            .st
            .store
            .range(RangeRequest::new(KeyRange::prefix(prefix.to_string())).serializable())
            .await?
            .kvs)
    }

    /// Claims `key` for this Service: `Ok(false)` when another one holds it.
    async fn claim(&mut self, key: String) -> ApiResult<bool> {
        let cur = self.st.store.get(key.clone()).await?;
        match cur {
            None => self.extra.compares.push(Compare::absent(key.clone())),
            Some(kv) if kv.value.as_ref() == self.me.as_bytes() => self
                .extra
                .compares
                .push(Compare::mod_revision_is(key.clone(), kv.mod_revision)),
            Some(_) => return Ok(false),
        }
        self.extra.ops.push(TxnOp::Put(PutRequest::new(
            key,
            self.me.clone().into_bytes(),
        )));
        Ok(true)
    }

    fn release(&mut self, key: String) {
        self.extra
            .ops
            .push(TxnOp::DeleteRange(DeleteRangeRequest::new(KeyRange::key(
                key,
            ))));
    }

    async fn next_ip(&mut self, pool: &IpPool, reserved: &[Ipv4Addr]) -> ApiResult<Ipv4Addr> {
        if self.used_ips.is_none() {
            let used = self
                .keys(IPS)
                .await?
                .iter()
                .filter_map(|kv| {
                    std::str::from_utf8(&kv.key)
                        .ok()?
                        .strip_prefix(IPS)?
                        .parse()
                        .ok()
                })
                .collect();
            self.used_ips = Some(used);
        }
        let used = self.used_ips.as_ref().expect("read above");
        let ip = pool
            .choose(used, reserved, rand::random())
            .ok_or_else(|| ApiError::internal("failed to allocate a serviceIP: range is full"))?;
        self.used_ips.as_mut().expect("read above").insert(ip);
        Ok(ip)
    }

    async fn next_port(&mut self, pool: &PortPool) -> ApiResult<u16> {
        if self.used_ports.is_none() {
            let used = self
                .keys(NODE_PORTS)
                .await?
                .iter()
                .filter_map(|kv| {
                    std::str::from_utf8(&kv.key)
                        .ok()?
                        .strip_prefix(NODE_PORTS)?
                        .parse()
                        .ok()
                })
                .collect();
            self.used_ports = Some(used);
        }
        let mut used = self.used_ports.clone().expect("read above");
        used.extend(self.claimed_ports.iter().copied());
        let p = pool
            .choose(&used, rand::random())
            .ok_or_else(|| ApiError::internal("failed to allocate a nodePort: range is full"))?;
        self.used_ports.as_mut().expect("read above").insert(p);
        Ok(p)
    }
}

fn invalid(svc: &Value, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid("", "Service", &svc_name(svc), causes)
}

/// Makes `clusterIP`/`clusterIPs`, `ipFamilies` and `ipFamilyPolicy` consistent and checks
/// them against this (single-stack IPv4) cluster, as upstream's strategy and
/// initIPFamilyFields do. Returns the requested IPs (empty: allocate; `["None"]`: headless).
fn normalize_ip_fields(svc: &mut Value, old: Option<&Value>) -> Result<Vec<String>, Vec<Cause>> {
    let mut causes = Vec::new();
    let spec = &svc["spec"];
    let ip = spec["clusterIP"].as_str().unwrap_or_default().to_string();
    let mut ips = str_list(spec.get("clusterIPs"));
    if !needs_cluster_ip(svc) {
        if !ip.is_empty() || !ips.is_empty() {
            causes.push(Cause::forbidden(
                "spec.clusterIPs",
                "may not be set for ExternalName services",
            ));
        }
        return if causes.is_empty() {
            Ok(vec![])
        } else {
            Err(causes)
        };
    }
    if ips.is_empty() && !ip.is_empty() {
        ips = vec![ip.clone()];
    } else if !ips.is_empty() && !ip.is_empty() && ips[0] != ip {
        causes.push(invalid_list(
            "spec.clusterIPs",
            &ips,
            "first value must match `clusterIP`",
        ));
        return Err(causes);
    }
    let headless = ips.first().map(String::as_str) == Some("None");
    for (i, s) in ips.iter().enumerate() {
        if s == "None" {
            if i > 0 {
                causes.push(invalid_list(
                    &format!("spec.clusterIPs[{i}]"),
                    &ips,
                    "must be empty when the first value is 'None'",
                ));
            }
            continue;
        }
        if headless {
            continue;
        }
        match s.parse::<IpAddr>() {
            Err(_) => causes.push(Cause::invalid(
                format!("spec.clusterIPs[{i}]"),
                &json!(s),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            )),
            Ok(IpAddr::V6(_)) => causes.push(invalid_list(
                &format!("spec.clusterIPs[{i}]"),
                &ips,
                "IPv6 is not configured on this cluster",
            )),
            Ok(IpAddr::V4(_)) if i > 0 => causes.push(invalid_list(
                &format!("spec.clusterIPs[{i}]"),
                &ips,
                "may specify no more than one IP for each IP family",
            )),
            Ok(IpAddr::V4(_)) => {}
        }
    }
    let selectorless = svc
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .is_none_or(|m| m.is_empty());
    let old_policy = old
        .filter(|o| needs_cluster_ip(o))
        .and_then(|o| o.pointer("/spec/ipFamilyPolicy"))
        .cloned();
    let policy = match svc.pointer("/spec/ipFamilyPolicy").and_then(Value::as_str) {
        Some(p) => p.to_string(),
        None => match old_policy.as_ref().and_then(Value::as_str) {
            Some(p) => p.to_string(),
            None if headless && selectorless => "RequireDualStack".into(),
            None => "SingleStack".into(),
        },
    };
    if !matches!(
        policy.as_str(),
        "SingleStack" | "PreferDualStack" | "RequireDualStack"
    ) {
        causes.push(Cause::not_supported(
            "spec.ipFamilyPolicy",
            &json!(policy),
            &["PreferDualStack", "RequireDualStack", "SingleStack"],
        ));
    }
    let mut families = str_list(svc.pointer("/spec/ipFamilies"));
    for (i, f) in families.iter().enumerate() {
        match f.as_str() {
            "IPv4" => {}
            "IPv6" if headless && selectorless => {}
            "IPv6" => causes.push(Cause::invalid(
                format!("spec.ipFamilies[{i}]"),
                &json!(f),
                "not configured on this cluster",
            )),
            _ => causes.push(Cause::not_supported(
                format!("spec.ipFamilies[{i}]"),
                &json!(f),
                &["IPv4", "IPv6"],
            )),
        }
    }
    if !(headless && selectorless) && policy == "RequireDualStack" {
        causes.push(Cause::invalid(
            "spec.ipFamilyPolicy",
            &json!(policy),
            "this cluster is not configured for dual-stack services",
        ));
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    if families.is_empty() {
        families.push("IPv4".into());
    }
    if headless && selectorless && policy != "SingleStack" && families.len() == 1 {
        families.push(
            if families[0] == "IPv4" {
                "IPv6"
            } else {
                "IPv4"
            }
            .into(),
        );
    }
    let spec = svc["spec"].as_object_mut().expect("a Service has a spec");
    spec.insert("ipFamilyPolicy".into(), json!(policy));
    spec.insert("ipFamilies".into(), json!(families));
    if !ips.is_empty() {
        spec.insert("clusterIP".into(), json!(ips[0]));
        spec.insert("clusterIPs".into(), json!(ips));
    }
    Ok(ips)
}

/// NodePorts on a type that has none.
fn node_port_causes(svc: &Value) -> Vec<Cause> {
    if needs_node_ports(svc) {
        return vec![];
    }
    let t = ty(svc).to_string();
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, p)| p["nodePort"].as_i64().is_some_and(|n| n != 0))
        .map(|(i, _)| {
            Cause::forbidden(
                format!("spec.ports[{i}].nodePort"),
                &format!("may not be used when `type` is '{t}'"),
            )
        })
        .collect()
}

/// Checks a requested ClusterIP and claims it.
async fn claim_ip(a: &mut Alloc<'_>, st: &ApiState, svc: &Value, ips: &[String]) -> ApiResult<()> {
    let pool = IpPool::new(&st.config.service_cidr);
    let ip: Ipv4Addr = ips[0]
        .parse()
        .map_err(|_| ApiError::internal("unparsed clusterIP"))?;
    if !pool.contains(ip) {
        return Err(invalid(
            svc,
            vec![invalid_list(
                "spec.clusterIPs",
                ips,
                &format!(
                    "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
                    st.config.service_cidr
                ),
            )],
        ));
    }
    if !a.claim(ip_key(ip)).await? {
        return Err(invalid(
            svc,
            vec![invalid_list(
                "spec.clusterIPs",
                ips,
                &format!("failed to allocate IP {ip}: provided IP is already allocated"),
            )],
        ));
    }
    Ok(())
}

/// Allocates a ClusterIP for a Service that needs one and has none requested.
async fn allocate_ip(a: &mut Alloc<'_>, st: &ApiState, svc: &mut Value) -> ApiResult<()> {
    let pool = IpPool::new(&st.config.service_cidr);
    let mut reserved = vec![st.config.service_cidr.nth(1)];
    if let IpAddr::V4(dns) = st.config.cluster_dns {
        reserved.push(dns);
    }
    for _ in 0..16 {
        let ip = a.next_ip(&pool, &reserved).await?;
        if a.claim(ip_key(ip)).await? {
            svc["spec"]["clusterIP"] = json!(ip.to_string());
            svc["spec"]["clusterIPs"] = json!([ip.to_string()]);
            return Ok(());
        }
    }
    Err(ApiError::internal(
        "failed to allocate a serviceIP: no free address found",
    ))
}

/// Claims requested NodePorts not held before (`old`) and allocates missing ones, as
/// upstream's initNodePorts/updateNodePorts: ports with the same number share a NodePort.
async fn allocate_node_ports(
    a: &mut Alloc<'_>,
    st: &ApiState,
    svc: &mut Value,
    old: &[u16],
) -> ApiResult<()> {
    let pool = PortPool::new(st.config.service_node_port_range);
    let auto = allocates_node_ports(svc);
    let n = svc["spec"]["ports"].as_array().map_or(0, Vec::len);
    let mut by_port: BTreeMap<i64, u16> = BTreeMap::new();
    for i in 0..n {
        let p = svc["spec"]["ports"][i].clone();
        let port = p["port"].as_i64().unwrap_or(0);
        let requested = p["nodePort"].as_i64().unwrap_or(0);
        if requested == 0 && !auto {
            continue;
        }
        let field = format!("spec.ports[{i}].nodePort");
        if requested != 0 {
            let np = u16::try_from(requested).ok().filter(|n| pool.contains(*n));
            let Some(np) = np else {
                return Err(invalid(
                    svc,
                    vec![Cause::invalid(
                        field,
                        &json!(requested),
                        &format!(
                            "provided port is not in the valid range. The range of valid ports is {}",
                            pool.describe()
                        ),
                    )],
                ));
            };
            if !old.contains(&np) && !a.claimed_ports.contains(&np) {
                if !a.claim(port_key(np)).await? {
                    return Err(invalid(
                        svc,
                        vec![Cause::invalid(
                            field,
                            &json!(requested),
                            "provided port is already allocated",
                        )],
                    ));
                }
                a.claimed_ports.insert(np);
            }
            by_port.entry(port).or_insert(np);
            continue;
        }
        // Later ports with the same number may have asked for a value: use it.
        let later = (i + 1..n)
            .map(|j| &svc["spec"]["ports"][j])
            .find(|q| q["port"].as_i64() == Some(port) && q["nodePort"].as_i64().unwrap_or(0) != 0)
            .and_then(|q| q["nodePort"].as_i64());
        let np = if let Some(&np) = by_port.get(&port) {
            np
        } else if let Some(req) = later {
            // Claimed when its own port is reached; take the same value here.
            u16::try_from(req).unwrap_or(0)
        } else {
            let mut got = None;
            for _ in 0..16 {
                let np = a.next_port(&pool).await?;
                if a.claim(port_key(np)).await? {
                    got = Some(np);
                    break;
                }
            }
            let np = got.ok_or_else(|| {
                ApiError::internal("failed to allocate a nodePort: no free port found")
            })?;
            a.claimed_ports.insert(np);
            np
        };
        by_port.entry(port).or_insert(np);
        svc["spec"]["ports"][i]["nodePort"] = json!(np);
    }
    Ok(())
}

/// Admission of a new Service.
pub async fn create(st: &ApiState, ns: &str, svc: &mut Value) -> ApiResult<TxnExtra> {
    if !svc.get("spec").is_some_and(Value::is_object) {
        svc["spec"] = json!({});
    }
    let mut causes = node_port_causes(svc);
    let ips = match normalize_ip_fields(svc, None) {
        Ok(ips) => ips,
        Err(c) => {
            causes.extend(c);
            vec![]
        }
    };
    if !causes.is_empty() {
        return Err(invalid(svc, causes));
    }
    if ty(svc) == "LoadBalancer" && svc.pointer("/spec/allocateLoadBalancerNodePorts").is_none() {
        svc["spec"]["allocateLoadBalancerNodePorts"] = json!(true);
    }
    let mut a = Alloc::new(st, ns, &svc_name(svc));
    if needs_cluster_ip(svc) {
        if ips.is_empty() {
            allocate_ip(&mut a, st, svc).await?;
        } else if ips[0] != "None" {
            claim_ip(&mut a, st, svc, &ips).await?;
        }
    }
    if needs_node_ports(svc) {
        allocate_node_ports(&mut a, st, svc, &[]).await?;
    }
    Ok(a.extra)
}

/// Admission of a change to a Service: keeps what it holds, allocates what a new type needs,
/// releases what it no longer uses; `clusterIPs[0]` may not change.
pub async fn update(st: &ApiState, ns: &str, old: &Value, svc: &mut Value) -> ApiResult<TxnExtra> {
    if !svc.get("spec").is_some_and(Value::is_object) {
        svc["spec"] = json!({});
    }
    let old_ips = cluster_ips(old);
    // Values the client left out are the ones held (upstream's patchAllocatedValues).
    if needs_cluster_ip(old) && needs_cluster_ip(svc) {
        let spec = svc["spec"].as_object_mut().expect("object");
        for field in ["clusterIP", "clusterIPs", "ipFamilies"] {
            // clusterIP is a string, the others lists; anything else counts as left out.
            let unset = match spec.get(field) {
                Some(Value::String(s)) if field == "clusterIP" => s.is_empty(),
                Some(Value::Array(a)) if field != "clusterIP" => a.is_empty(),
                _ => true,
            };
            if let Some(v) = old["spec"].get(field).filter(|_| unset) {
                spec.insert(field.into(), v.clone());
            }
        }
    }
    if needs_node_ports(old) && needs_node_ports(svc) {
        let old_by_name: BTreeMap<String, i64> = old["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    p["nodePort"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        let new_used: HashSet<u16> = node_ports(svc).into_iter().collect();
        let old_used: HashSet<u16> = node_ports(old).into_iter().collect();
        if let Some(ports) = svc["spec"]["ports"].as_array_mut() {
            for p in ports {
                if p["nodePort"].as_i64().unwrap_or(0) != 0 {
                    continue;
                }
                let name = p["name"].as_str().unwrap_or_default();
                if let Some(&v) = old_by_name.get(name).filter(|v| **v != 0) {
                    let used_both = u16::try_from(v)
                        .is_ok_and(|v| new_used.contains(&v) && old_used.contains(&v));
                    if !used_both {
                        p["nodePort"] = json!(v);
                    }
                }
            }
        }
    }
    // A type that does not use them drops the values held (upstream's
    // dropTypeDependentFields), unless the client changed them.
    if needs_cluster_ip(old) && !needs_cluster_ip(svc) {
        let spec = svc["spec"].as_object_mut().expect("object");
        if cluster_ips(&json!({"spec": spec.clone()})) == old_ips {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        }
        if spec.get("ipFamilies") == old.pointer("/spec/ipFamilies") {
            spec.remove("ipFamilies");
        }
        if spec.get("ipFamilyPolicy") == old.pointer("/spec/ipFamilyPolicy") {
            spec.remove("ipFamilyPolicy");
        }
    }
    if needs_node_ports(old) && !needs_node_ports(svc) && node_ports(svc) == node_ports(old) {
        if let Some(ports) = svc["spec"]["ports"].as_array_mut() {
            for p in ports {
                if let Some(m) = p.as_object_mut() {
                    m.remove("nodePort");
                }
            }
        }
    }
    let mut causes = node_port_causes(svc);
    let ips = match normalize_ip_fields(svc, Some(old)) {
        Ok(ips) => ips,
        Err(c) => {
            causes.extend(c);
            vec![]
        }
    };
    if causes.is_empty()
        && needs_cluster_ip(old)
        && needs_cluster_ip(svc)
        && !old_ips.is_empty()
        && ips.first() != old_ips.first()
    {
        let shown = if ips.is_empty() { vec![] } else { ips.clone() };
        causes.push(invalid_list(
            "spec.clusterIPs[0]",
            &shown,
            "may not change once set",
        ));
    }
    if !causes.is_empty() {
        return Err(invalid(svc, causes));
    }
    if ty(svc) == "LoadBalancer" && svc.pointer("/spec/allocateLoadBalancerNodePorts").is_none() {
        svc["spec"]["allocateLoadBalancerNodePorts"] = json!(true);
    }
    let mut a = Alloc::new(st, ns, &svc_name(svc));
    // ClusterIPs: allocated when a Service starts needing one, released when it stops.
    if !needs_cluster_ip(old) && needs_cluster_ip(svc) {
        if ips.is_empty() {
            allocate_ip(&mut a, st, svc).await?;
        } else if ips[0] != "None" {
            claim_ip(&mut a, st, svc, &ips).await?;
        }
    } else if needs_cluster_ip(old) && !needs_cluster_ip(svc) {
        for ip in old_ips.iter().filter_map(|s| s.parse::<Ipv4Addr>().ok()) {
            a.release(ip_key(ip));
        }
    }
    let held = if needs_node_ports(old) {
        node_ports(old)
    } else {
        vec![]
    };
    if needs_node_ports(svc) {
        allocate_node_ports(&mut a, st, svc, &held).await?;
    }
    let now: HashSet<u16> = if needs_node_ports(svc) {
        node_ports(svc).into_iter().collect()
    } else {
        HashSet::new()
    };
    for p in node_ports(old) {
        if !now.contains(&p) {
            a.release(port_key(p));
        }
    }
    Ok(a.extra)
}

/// Deletes of the keys a removed Service held.
pub fn removed(svc: &Value) -> Vec<TxnOp> {
    let mut keys: Vec<String> = Vec::new();
    if needs_cluster_ip(svc) {
        keys.extend(
            cluster_ips(svc)
                .iter()
                .filter_map(|s| s.parse::<Ipv4Addr>().ok())
                .map(ip_key),
        );
    }
    keys.extend(node_ports(svc).into_iter().map(port_key));
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| TxnOp::DeleteRange(DeleteRangeRequest::new(KeyRange::key(k))))
        .collect()
}

/// What a Service holds: its allocation keys.
fn held_keys(svc: &Value, pool: &IpPool) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if needs_cluster_ip(svc) {
        for ip in cluster_ips(svc)
            .iter()
            .filter_map(|s| s.parse::<Ipv4Addr>().ok())
        {
            if pool.contains(ip) {
                keys.insert(ip_key(ip));
            }
        }
    }
    keys.extend(node_ports(svc).into_iter().map(port_key));
    keys
}

/// What one repair pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Keys removed (their Service is gone or does not hold them).
    pub released: usize,
    /// Keys restored for Services that lacked them.
    pub restored: usize,
    /// Values held by two Services (reported, left alone).
    pub conflicts: Vec<String>,
}

/// Decides a repair from one snapshot: keys (key → holder) and Services
/// (`ns/name` → keys they hold). Returns the keys to delete and the (key, holder) to add.
pub fn plan_repair(
    keys: &BTreeMap<String, String>,
    services: &BTreeMap<String, BTreeSet<String>>,
) -> (Vec<String>, Vec<(String, String)>, Vec<String>) {
    let mut delete = Vec::new();
    for (k, h) in keys {
        if !services.get(h).is_some_and(|held| held.contains(k)) {
            delete.push(k.clone());
        }
    }
    let mut add = Vec::new();
    let mut conflicts = Vec::new();
    let mut wanted: BTreeMap<&String, &String> = BTreeMap::new();
    for (svc, held) in services {
        for k in held {
            if let Some(other) = wanted.insert(k, svc) {
                conflicts.push(format!("{k} is held by {other} and {svc}"));
                continue;
            }
            let ok = keys.get(k) == Some(svc);
            if !ok
                && !keys
                    .get(k)
                    .is_some_and(|h| services.get(h).is_some_and(|s| s.contains(k)))
            {
                add.push((k.clone(), svc.clone()));
            } else if !ok {
                conflicts.push(format!("{k} is held by {} and {svc}", keys[k]));
            }
        }
    }
    (delete, add, conflicts)
}

/// One repair pass over the allocation keys (upstream's repair loops): from one snapshot of
/// Services and keys, removes keys nobody holds and restores keys Services lack, each change
/// conditional on what was read.
pub async fn repair(st: &ApiState) -> ApiResult<Repaired> {
    let def = st
        .registry
        .get("", "v1", "services")
        .ok_or_else(|| ApiError::internal("services resource missing"))?;
    let svcs = st
        .store
        .range(RangeRequest::new(KeyRange::prefix(def.key_prefix(None))))
        .await?;
    let rev = svcs.revision;
    let pool = IpPool::new(&st.config.service_cidr);
    let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut svc_rev: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for kv in &svcs.kvs {
        let Ok(v) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let ns = v
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let h = holder(ns, &svc_name(&v));
        services.insert(h.clone(), held_keys(&v, &pool));
        svc_rev.insert(
            h,
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
            ),
        );
    }
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut key_rev: BTreeMap<String, i64> = BTreeMap::new();
    for prefix in [IPS, NODE_PORTS] {
        let r = st
            .store
            .range(RangeRequest::new(KeyRange::prefix(prefix.to_string())).revision(rev))
            .await?;
        for kv in r.kvs {
            let k = String::from_utf8_lossy(&kv.key).into_owned();
            key_rev.insert(k.clone(), kv.mod_revision);
            keys.insert(k, String::from_utf8_lossy(&kv.value).into_owned());
        }
    }
    let (delete, add, conflicts) = plan_repair(&keys, &services);
    let mut out = Repaired {
        conflicts,
        ..Default::default()
    };
    for k in delete {
        let t = TxnRequest::new()
            .when([Compare::mod_revision_is(k.clone(), key_rev[&k])])
            .and_then([TxnOp::DeleteRange(DeleteRangeRequest::new(KeyRange::key(
                k.clone(),
            )))]);
        if st.store.txn(t).await?.succeeded {
            out.released += 1;
        }
    }
    for (k, h) in add {
        let (svc_key, srev) = svc_rev[&h].clone();
        let t = TxnRequest::new()
            .when([
                Compare::absent(k.clone()),
                Compare::mod_revision_is(svc_key, srev),
            ])
            .and_then([TxnOp::Put(PutRequest::new(k.clone(), h.into_bytes()))]);
        if st.store.txn(t).await?.succeeded {
            out.restored += 1;
        }
    }
    Ok(out)
}

/// The `kubernetes` Service in `default`: the first address of the service CIDR, port 443
/// (`https`) to the API server's port. Created when missing (at start and by the repair loop).
pub fn kubernetes_service(st: &ApiState) -> Value {
    let ip = st.config.service_cidr.nth(1).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": st.config.https_port}],
            "sessionAffinity": "None",
        },
    })
}

/// The `kubernetes` Endpoints (upstream's endpoint reconciler): this server's advertised
/// address and port, not mirrored into slices by the mirroring controller.
pub fn kubernetes_endpoints(st: &ApiState) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{
            "addresses": [{"ip": st.config.advertise_address.to_string()}],
            "ports": [{"name": "https", "port": st.config.https_port, "protocol": "TCP"}],
        }],
    })
}

/// The `kubernetes` EndpointSlice, as upstream's endpoints adapter derives it.
pub fn kubernetes_endpoint_slice(st: &ApiState) -> Value {
    let family = if st.config.advertise_address.is_ipv6() {
        "IPv6"
    } else {
        "IPv4"
    };
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": family,
        "endpoints": [{"addresses": [st.config.advertise_address.to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": st.config.https_port, "protocol": "TCP"}],
    })
}

/// Creates the `kubernetes` Service when missing and brings its Endpoints and EndpointSlice
/// to this server's advertised address (upstream's controlplane endpoint reconciler); run at
/// start and every few seconds by the housekeeping loop.
pub async fn ensure_kubernetes(st: &ApiState) -> ApiResult<()> {
    use crate::api::objects::{self, Part, WriteOpts};
    let opts = WriteOpts {
        dry_run: false,
        field_validation: crate::api::request::FieldValidation::Ignore,
        field_manager: "kube-apiserver".into(),
        operation: "Update",
    };
    let user = crate::api::User {
        name: "system:apiserver".into(),
        groups: vec!["system:masters".into()],
    };
    let def = |g: &str, p: &str| {
        st.registry
            .get(g, "v1", p)
            .ok_or_else(|| ApiError::internal(format!("{p} resource missing")))
    };
    let svc_def = def("", "services")?;
    match objects::get(st, &svc_def, Some("default"), "kubernetes").await {
        Ok(cur) => {
            let want = kubernetes_service(st);
            if cur.pointer("/spec/ports") != want.pointer("/spec/ports") {
                let mut o = cur.clone();
                o["spec"]["ports"] = want["spec"]["ports"].clone();
                match objects::update(
                    st,
                    &svc_def,
                    Some("default"),
                    "kubernetes",
                    o,
                    Part::Main,
                    &opts,
                    None,
                )
                .await
                {
                    Ok(_) => {}
                    Err(e) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Err(e) if e.code == 404 => {
            match objects::create(
                st,
                &svc_def,
                Some("default"),
                kubernetes_service(st),
                &opts,
                &user,
            )
            .await
            {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    for (d, want, fields) in [
        (
            def("", "endpoints")?,
            kubernetes_endpoints(st),
            &["subsets"][..],
        ),
        (
            st.registry
                .get("discovery.k8s.io", "v1", "endpointslices")
                .ok_or_else(|| ApiError::internal("endpointslices resource missing"))?,
            kubernetes_endpoint_slice(st),
            &["addressType", "endpoints", "ports"][..],
        ),
    ] {
        match objects::get(st, &d, Some("default"), "kubernetes").await {
            Ok(cur) => {
                let same = fields.iter().all(|f| cur.get(*f) == want.get(*f))
                    && cur.pointer("/metadata/labels") == want.pointer("/metadata/labels");
                if !same {
                    let mut o = cur.clone();
                    for f in fields {
                        o[*f] = want[*f].clone();
                    }
                    o["metadata"]["labels"] = want["metadata"]["labels"].clone();
                    match objects::update(
                        st,
                        &d,
                        Some("default"),
                        "kubernetes",
                        o,
                        Part::Main,
                        &opts,
                        None,
                    )
                    .await
                    {
                        Ok(_) => {}
                        Err(e) if e.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) if e.code == 404 => {
                match objects::create(st, &d, Some("default"), want, &opts, &user).await {
                    Ok(_) => {}
                    Err(e) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn automatic_ips_avoid_used_and_reserved_addresses_and_prefer_the_upper_band() {
        let pool = IpPool::new(&cidr("10.43.0.0/16"));
        let reserved = [Ipv4Addr::new(10, 43, 0, 1), Ipv4Addr::new(10, 43, 0, 10)];
        for rnd in [0u64, 1, 7, 255, 65_000, u64::MAX] {
            let ip = pool.choose(&HashSet::new(), &reserved, rnd).unwrap();
            assert!(pool.contains(ip));
            assert!(
                u32::from(ip) >= u32::from(Ipv4Addr::new(10, 43, 1, 1)),
                "{ip} is in the upper band"
            );
        }
        // A tiny range: everything but the reserved and used addresses.
        let pool = IpPool::new(&cidr("10.96.0.0/29"));
        let used: HashSet<Ipv4Addr> = [2, 3, 4, 5]
            .iter()
            .map(|i| Ipv4Addr::new(10, 96, 0, *i))
            .collect();
        let reserved = [Ipv4Addr::new(10, 96, 0, 1)];
        for rnd in 0..20 {
            assert_eq!(
                pool.choose(&used, &reserved, rnd),
                Some(Ipv4Addr::new(10, 96, 0, 6))
            );
        }
        let mut full = used.clone();
        full.insert(Ipv4Addr::new(10, 96, 0, 6));
        assert_eq!(pool.choose(&full, &reserved, 3), None, "range full");
        assert!(
            !pool.contains(Ipv4Addr::new(10, 96, 0, 0)),
            "network address"
        );
        assert!(
            !pool.contains(Ipv4Addr::new(10, 96, 0, 7)),
            "broadcast address"
        );
        assert!(!pool.contains(Ipv4Addr::new(10, 99, 0, 5)));
    }

    #[test]
    fn automatic_node_ports_avoid_used_ones_and_stay_in_range() {
        let pool = PortPool::new((30000, 32767));
        let used: HashSet<u16> = (30000..32767).collect();
        assert_eq!(pool.choose(&used, 12345), Some(32767));
        let used: HashSet<u16> = (30000..=32767).collect();
        assert_eq!(pool.choose(&used, 1), None);
        for rnd in [0, 5, 99_999] {
            let p = pool.choose(&HashSet::new(), rnd).unwrap();
            assert!((30086..=32767).contains(&p), "{p} in the upper band");
        }
        assert_eq!(pool.describe(), "30000-32767");
    }

    #[test]
    fn ip_fields_get_upstream_defaults_and_bad_requests_upstream_errors() {
        let mut s = json!({"spec": {"selector": {"a": "b"}, "ports": [{"port": 80}]}});
        assert_eq!(
            normalize_ip_fields(&mut s, None).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(s["spec"]["ipFamilyPolicy"], "SingleStack");
        assert_eq!(s["spec"]["ipFamilies"], json!(["IPv4"]));

        let mut s = json!({"spec": {"clusterIP": "10.43.0.5"}});
        assert_eq!(
            normalize_ip_fields(&mut s, None).unwrap(),
            vec!["10.43.0.5"]
        );
        assert_eq!(s["spec"]["clusterIPs"], json!(["10.43.0.5"]));

        let mut s = json!({"spec": {"clusterIP": "None"}});
        normalize_ip_fields(&mut s, None).unwrap();
        assert_eq!(
            s["spec"]["ipFamilyPolicy"], "RequireDualStack",
            "headless without selector"
        );
        assert_eq!(s["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));

        let mut s = json!({"spec": {"clusterIP": "None", "selector": {"a": "b"}}});
        normalize_ip_fields(&mut s, None).unwrap();
        assert_eq!(s["spec"]["ipFamilyPolicy"], "SingleStack");

        let mut s = json!({"spec": {"clusterIP": "nope"}});
        let c = normalize_ip_fields(&mut s, None).unwrap_err();
        assert_eq!(c[0].field, "spec.clusterIPs[0]");
        assert!(c[0].message.contains("must be a valid IP address"), "{c:?}");

        let mut s = json!({"spec": {"clusterIPs": ["fd00::1"]}});
        let c = normalize_ip_fields(&mut s, None).unwrap_err();
        assert_eq!(
            c[0].message,
            "Invalid value: []string{\"fd00::1\"}: IPv6 is not configured on this cluster"
        );

        let mut s = json!({"spec": {"type": "ExternalName", "clusterIP": "10.43.0.9"}});
        assert_eq!(
            normalize_ip_fields(&mut s, None).unwrap_err()[0].field,
            "spec.clusterIPs"
        );
    }

    #[test]
    fn node_ports_are_forbidden_on_cluster_ip_services() {
        let s = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30080}]}});
        let c = node_port_causes(&s);
        assert_eq!(c[0].field, "spec.ports[0].nodePort");
        assert_eq!(
            c[0].message,
            "Forbidden: may not be used when `type` is 'ClusterIP'"
        );
    }

    #[test]
    fn removal_releases_every_key_a_service_held() {
        let s = json!({"spec": {"type": "NodePort", "clusterIP": "10.43.3.4", "clusterIPs": ["10.43.3.4"],
            "ports": [{"port": 80, "nodePort": 30080}, {"port": 81, "nodePort": 30081}]}});
        let keys: Vec<String> = removed(&s)
            .into_iter()
            .map(|op| match op {
                TxnOp::DeleteRange(d) => String::from_utf8(d.range.start.to_vec()).unwrap(),
                _ => panic!("not a delete"),
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                ip_key(Ipv4Addr::new(10, 43, 3, 4)),
                port_key(30080),
                port_key(30081)
            ]
        );
        let headless = json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}});
        assert!(removed(&headless).is_empty());
    }

    #[test]
    fn repair_removes_orphaned_keys_and_restores_missing_ones() {
        let k = |s: &str| s.to_string();
        let keys: BTreeMap<String, String> = [
            (k("/ip/a"), k("ns/a")),       // held: fine
            (k("/ip/gone"), k("ns/gone")), // service gone
            (k("/ip/moved"), k("ns/a")),   // a no longer holds it
        ]
        .into_iter()
        .collect();
        let services: BTreeMap<String, BTreeSet<String>> = [
            (k("ns/a"), [k("/ip/a")].into_iter().collect()),
            (k("ns/b"), [k("/ip/b"), k("/port/1")].into_iter().collect()),
        ]
        .into_iter()
        .collect();
        let (del, add, conflicts) = plan_repair(&keys, &services);
        assert_eq!(del, vec![k("/ip/gone"), k("/ip/moved")]);
        assert_eq!(
            add,
            vec![(k("/ip/b"), k("ns/b")), (k("/port/1"), k("ns/b"))]
        );
        assert!(conflicts.is_empty());
        // Two services claiming one address: reported, not touched.
        let services: BTreeMap<String, BTreeSet<String>> = [
            (k("ns/a"), [k("/ip/a")].into_iter().collect()),
            (k("ns/c"), [k("/ip/a")].into_iter().collect()),
        ]
        .into_iter()
        .collect();
        let (del, add, conflicts) = plan_repair(&keys, &services);
        assert!(add.is_empty());
        assert_eq!(conflicts.len(), 1);
        assert_eq!(del.len(), 2);
    }
}
