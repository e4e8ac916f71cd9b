//! HTTP pieces shared by the API server and the kubelet API (neither depends on the other):
//! the response body type, URL decoding and the identity in a client certificate.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// Every response body: whole or streamed, never failing mid-way (a broken upstream ends it).
pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Decodes `%xx` escapes (and nothing else).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b&c=d` with `%xx` and `+` decoded, repeated keys kept in order.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| percent_decode(&s.replace('+', " "));
            (dec(k), dec(v))
        })
        .collect()
}

/// Percent-encodes a query key or value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The user name (CN) and groups (O) of a verified client certificate.
pub fn cert_identity(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some((name, groups))
}

/// The kubelet API of the agent embedded in this process, reachable without a network: a
/// function that returns one end of a fresh in-memory connection whose other end the kubelet
/// API serves (as the API server's kubelet client). The API server's proxy uses it for its own
/// node instead of a TLS connection to `:10250` (no encryption, no sockets on the way).
pub type LocalDial = std::sync::Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>;

fn local_kubelets() -> &'static std::sync::Mutex<std::collections::HashMap<String, LocalDial>> {
    static M: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, LocalDial>>> =
        std::sync::OnceLock::new();
    M.get_or_init(Default::default)
}

/// Registers the in-process kubelet of a node (called by the embedded agent).
pub fn register_local_kubelet(node: &str, dial: LocalDial) {
    if let Ok(mut m) = local_kubelets().lock() {
        m.insert(node.to_string(), dial);
    }
}

/// The in-process kubelet of a node, if this process runs it.
pub fn local_kubelet(node: &str) -> Option<LocalDial> {
    local_kubelets().lock().ok()?.get(node).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_repeated_keys_in_order_and_escape_back() {
        let pairs = query_pairs("command=sh&command=-c&command=echo+a%20b&tty=true");
        assert_eq!(
            pairs,
            vec![
                ("command".to_string(), "sh".to_string()),
                ("command".to_string(), "-c".to_string()),
                ("command".to_string(), "echo a b".to_string()),
                ("tty".to_string(), "true".to_string()),
            ]
        );
        assert_eq!(query_escape("echo a&b=c/"), "echo%20a%26b%3Dc%2F");
        assert_eq!(
            query_pairs(&format!("x={}", query_escape("a+b c")))[0].1,
            "a+b c"
        );
    }
}
