//! Resource quantities (`100m`, `1.5`, `128Mi`, `1G`, `1e3`) and pod resource requests as the
//! scheduler counts them.

use serde_json::Value;

/// A quantity in thousandths of its unit (millicores for cpu, milli-bytes for memory).
pub fn parse_milli(s: &str) -> Option<i128> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (num, mult_num, mult_den): (&str, i128, i128) = {
        let suffixes: [(&str, i128, i128); 14] = [
            ("Ki", 1 << 10, 1),
            ("Mi", 1 << 20, 1),
            ("Gi", 1 << 30, 1),
            ("Ti", 1 << 40, 1),
            ("Pi", 1 << 50, 1),
            ("Ei", 1 << 60, 1),
            ("n", 1, 1_000_000_000),
            ("u", 1, 1_000_000),
            ("m", 1, 1_000),
            ("k", 1_000, 1),
            ("M", 1_000_000, 1),
            ("G", 1_000_000_000, 1),
            ("T", 1_000_000_000_000, 1),
            ("P", 1_000_000_000_000_000, 1),
        ];
        if let Some((n, m, d)) = suffixes
            .iter()
            .find_map(|(suf, m, d)| s.strip_suffix(suf).map(|n| (n, *m, *d)))
        {
            (n, m, d)
        } else if let Some(n) = s.strip_suffix('E').filter(|n| !n.contains(['e', 'E'])) {
            (n, 1_000_000_000_000_000_000, 1)
        } else {
            (s, 1, 1)
        }
    };
    // Decimal mantissa with an optional exponent.
    let (mantissa, exp) = match num.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (num, 0),
    };
    let neg = mantissa.starts_with('-');
    let mantissa = mantissa.trim_start_matches(['+', '-']);
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: i128 = format!("{int}{frac}").parse().ok()?;
    let scale = exp - frac.len() as i32 + 3; // thousandths
    let mut v = digits.checked_mul(mult_num)?;
    if scale >= 0 {
        v = v.checked_mul(10i128.checked_pow(scale as u32)?)?;
        v /= mult_den;
    } else {
        let d = 10i128.checked_pow((-scale) as u32)?.checked_mul(mult_den)?;
        // Round up, as upstream does for fractional milli-values.
        v = (v + d - 1) / d;
    }
    Some(if neg { -v } else { v })
}

/// A byte quantity (`128Mi`, `1G`, `1000`), rounded up to whole bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let m = parse_milli(s)?;
    (m >= 0).then(|| ((m + 999) / 1000) as u64)
}

/// A cpu quantity (`100m`, `1.5`) in millicores.
pub fn parse_millis(s: &str) -> Option<i128> {
    parse_milli(s).filter(|m| *m >= 0)
}

/// A quantity field of an object (string or number) in thousandths.
pub fn milli_of(v: Option<&Value>) -> i128 {
    match v {
        Some(Value::String(s)) => parse_milli(s).unwrap_or(0),
        Some(Value::Number(n)) => (n.as_f64().unwrap_or(0.0) * 1000.0).round() as i128,
        _ => 0,
    }
}

/// What a pod asks of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub cpu_milli: i128,
    pub memory_milli: i128,
    pub ephemeral_milli: i128,
}

impl Requests {
    pub fn add(&mut self, o: &Requests) {
        self.cpu_milli += o.cpu_milli;
        self.memory_milli += o.memory_milli;
        self.ephemeral_milli += o.ephemeral_milli;
    }
    pub fn sub(&mut self, o: &Requests) {
        self.cpu_milli -= o.cpu_milli;
        self.memory_milli -= o.memory_milli;
        self.ephemeral_milli -= o.ephemeral_milli;
    }
}

/// Upstream's defaults for a container that states no cpu or memory request (scoring only).
pub const DEFAULT_CPU_MILLI: i128 = 100;
pub const DEFAULT_MEMORY_MILLI: i128 = 200 * 1024 * 1024 * 1000;

/// A container's requests (a limit without a request counts as the request, as API defaulting
/// makes it). With `nonzero`, a cpu or memory request the container does not state at all counts
/// as upstream's default (an explicit zero stays zero).
fn container_requests(c: &Value, nonzero: bool) -> Requests {
    let r = |res: &str, default: i128| {
        let req = c.pointer(&format!("/resources/requests/{res}"));
        let lim = c.pointer(&format!("/resources/limits/{res}"));
        match req.or(lim) {
            None if nonzero => default,
            v => milli_of(v),
        }
    };
    Requests {
        cpu_milli: r("cpu", DEFAULT_CPU_MILLI),
        memory_milli: r("memory", DEFAULT_MEMORY_MILLI),
        ephemeral_milli: r("ephemeral-storage", 0),
    }
}

/// Upstream's effective requests: the sum over containers (and sidecars, init containers with
/// `restartPolicy: Always`), or the largest init container (with the sidecars started before it)
/// if larger, per resource; plus the pod overhead.
pub fn pod_requests(pod: &Value) -> Requests {
    requests(pod, false)
}

/// `pod_requests` with upstream's defaults for containers that state no cpu or memory request:
/// what the scoring plugins count (upstream's `NonZeroRequested`).
pub fn pod_requests_nonzero(pod: &Value) -> Requests {
    requests(pod, true)
}

fn requests(pod: &Value, nonzero: bool) -> Requests {
    let mut sum = Requests::default();
    for c in pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        sum.add(&container_requests(c, nonzero));
    }
    let mut init_max = Requests::default();
    let mut sidecars = Requests::default();
    for c in pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let r = container_requests(c, nonzero);
        if c["restartPolicy"] == "Always" {
            // Sidecars run alongside the app containers.
            sidecars.add(&r);
            sum.add(&r);
            continue;
        }
        let mut with_sidecars = r;
        with_sidecars.add(&sidecars);
        init_max.cpu_milli = init_max.cpu_milli.max(with_sidecars.cpu_milli);
        init_max.memory_milli = init_max.memory_milli.max(with_sidecars.memory_milli);
        init_max.ephemeral_milli = init_max.ephemeral_milli.max(with_sidecars.ephemeral_milli);
    }
    let mut out = Requests {
        cpu_milli: sum.cpu_milli.max(init_max.cpu_milli),
        memory_milli: sum.memory_milli.max(init_max.memory_milli),
        ephemeral_milli: sum.ephemeral_milli.max(init_max.ephemeral_milli),
    };
    if let Some(o) = pod.pointer("/spec/overhead") {
        out.cpu_milli += milli_of(o.get("cpu"));
        out.memory_milli += milli_of(o.get("memory"));
        out.ephemeral_milli += milli_of(o.get("ephemeral-storage"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_parse_as_upstream() {
        assert_eq!(parse_milli("100m"), Some(100));
        assert_eq!(parse_milli("1"), Some(1000));
        assert_eq!(parse_milli("1.5"), Some(1500));
        assert_eq!(parse_milli("128Mi"), Some(128 * 1024 * 1024 * 1000));
        assert_eq!(parse_milli("1G"), Some(1_000_000_000_000));
        assert_eq!(parse_milli("1e3"), Some(1_000_000));
        assert_eq!(parse_milli("0.5Gi"), Some((1i128 << 29) * 1000));
        assert_eq!(parse_milli("1Ki"), Some(1024 * 1000));
        assert_eq!(parse_milli("abc"), None);
        assert_eq!(parse_milli(""), None);
    }

    #[test]
    fn init_containers_count_as_upstream() {
        let pod = json!({"spec": {
            "initContainers": [{"resources": {"requests": {"cpu": "2"}}}],
            "containers": [{"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}, {"resources": {"limits": {"cpu": "500m"}}}],
        }});
        let r = pod_requests(&pod);
        assert_eq!(
            r.cpu_milli, 2000,
            "the init container's 2 cpu exceeds the containers' 1"
        );
        assert_eq!(r.memory_milli, (1i128 << 30) * 1000);
    }

    #[test]
    fn scoring_defaults_apply_per_container_that_states_nothing() {
        let pod = json!({"spec": {
            "containers": [
                {"resources": {"requests": {"cpu": "200m"}}},
                {},
                {"resources": {"requests": {"cpu": "0", "memory": "0"}}},
            ],
            "overhead": {"cpu": "50m", "ephemeral-storage": "1Ki"},
        }});
        let r = pod_requests_nonzero(&pod);
        // 200m + 100m (unstated) + 0 (an explicit zero stays) + 50m of overhead.
        assert_eq!(r.cpu_milli, 350);
        assert_eq!(r.memory_milli, 2 * DEFAULT_MEMORY_MILLI);
        assert_eq!(r.ephemeral_milli, 1024 * 1000);
        let r = pod_requests(&pod);
        assert_eq!((r.cpu_milli, r.memory_milli), (250, 0));
    }
}
