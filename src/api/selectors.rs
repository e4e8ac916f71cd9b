//! Label selectors (every operator of upstream's `labels.Parse`) and field selectors.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::api::status::{ApiError, ApiResult};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed label selector; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || !crate::api::validation::is_dns1123_subdomain(p) {
            return false;
        }
    }
    crate::api::validation::is_qualified_name_part(name)
}

fn valid_label_value(v: &str) -> bool {
    v.is_empty() || crate::api::validation::is_qualified_name_part(v)
}

impl LabelSelector {
    pub fn parse(s: &str) -> ApiResult<LabelSelector> {
        let mut p = Parser {
            s: s.as_bytes(),
            pos: 0,
            src: s,
        };
        let mut reqs = Vec::new();
        p.ws();
        if p.eof() {
            return Ok(LabelSelector { reqs });
        }
        loop {
            reqs.push(p.requirement()?);
            p.ws();
            if p.eof() {
                break;
            }
            p.expect(b',')?;
        }
        Ok(LabelSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| {
            let v = labels.get(&r.key);
            match &r.op {
                Op::Eq(x) => v == Some(x),
                Op::NotEq(x) => v != Some(x),
                Op::In(xs) => v.is_some_and(|v| xs.contains(v)),
                Op::NotIn(xs) => !v.is_some_and(|v| xs.contains(v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }

    /// Matches an object's `metadata.labels`.
    pub fn matches_object(&self, obj: &Value) -> bool {
        if self.reqs.is_empty() {
            return true;
        }
        self.matches(&labels_of(obj))
    }
}

/// Builds a selector from a `metav1.LabelSelector` object (matchLabels + matchExpressions).
pub fn from_label_selector_object(sel: &Value) -> ApiResult<LabelSelector> {
    let mut reqs = Vec::new();
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            reqs.push(Requirement {
                key: k.clone(),
                op: Op::Eq(v.as_str().unwrap_or_default().to_string()),
            });
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e["key"].as_str().unwrap_or_default().to_string();
            let values: Vec<String> = e["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let op = match e["operator"].as_str().unwrap_or_default() {
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "{other:?} is not a valid label selector operator"
                    )))
                }
            };
            reqs.push(Requirement { key, op });
        }
    }
    Ok(LabelSelector { reqs })
}

pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn eof(&self) -> bool {
        self.pos >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n')) {
            self.pos += 1;
        }
    }
    fn err(&self, what: &str) -> ApiError {
        ApiError::bad_request(format!(
            "unable to parse requirement: {what} in label selector {:?}",
            self.src
        ))
    }
    fn expect(&mut self, c: u8) -> ApiResult<()> {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected {:?}", c as char)))
        }
    }
    fn ident(&mut self) -> String {
        self.ws();
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/') {
                self.pos += 1;
            } else {
                break;
            }
        }
        self.src[start..self.pos].to_string()
    }
    fn keyword(&mut self, kw: &str) -> bool {
        self.ws();
        let rest = &self.s[self.pos..];
        if rest.len() >= kw.len()
            && &rest[..kw.len()] == kw.as_bytes()
            && rest
                .get(kw.len())
                .is_none_or(|c| !c.is_ascii_alphanumeric())
        {
            self.pos += kw.len();
            true
        } else {
            false
        }
    }
    fn value_list(&mut self) -> ApiResult<Vec<String>> {
        self.expect(b'(')?;
        let mut out = Vec::new();
        loop {
            self.ws();
            if self.peek() == Some(b')') {
                self.pos += 1;
                return Ok(out);
            }
            let v = self.ident();
            if !valid_label_value(&v) {
                return Err(self.err(&format!("invalid label value: {v:?}")));
            }
            out.push(v);
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') => {}
                _ => return Err(self.err("expected ',' or ')'")),
            }
        }
    }
    fn requirement(&mut self) -> ApiResult<Requirement> {
        self.ws();
        if self.peek() == Some(b'!') {
            self.pos += 1;
            let key = self.ident();
            if !valid_label_key(&key) {
                return Err(self.err(&format!("invalid label key {key:?}")));
            }
            return Ok(Requirement {
                key,
                op: Op::DoesNotExist,
            });
        }
        let key = self.ident();
        if key.is_empty() || !valid_label_key(&key) {
            return Err(self.err(&format!("invalid label key {key:?}")));
        }
        self.ws();
        let op = match self.peek() {
            None | Some(b',') => Op::Exists,
            Some(b'=') => {
                self.pos += 1;
                if self.peek() == Some(b'=') {
                    self.pos += 1;
                }
                let v = self.ident();
                if !valid_label_value(&v) {
                    return Err(self.err(&format!("invalid label value: {v:?}")));
                }
                Op::Eq(v)
            }
            Some(b'!') => {
                self.pos += 1;
                self.expect(b'=')?;
                let v = self.ident();
                if !valid_label_value(&v) {
                    return Err(self.err(&format!("invalid label value: {v:?}")));
                }
                Op::NotEq(v)
            }
            Some(b'>') | Some(b'<') => {
                let gt = self.peek() == Some(b'>');
                self.pos += 1;
                let v = self.ident();
                let n: i64 = v.parse().map_err(|_| {
                    self.err(&format!(
                        "for 'Gt', 'Lt' operators, the value must be an integer: {v:?}"
                    ))
                })?;
                if gt {
                    Op::Gt(n)
                } else {
                    Op::Lt(n)
                }
            }
            _ => {
                if self.keyword("notin") {
                    Op::NotIn(self.value_list()?)
                } else if self.keyword("in") {
                    Op::In(self.value_list()?)
                } else {
                    return Err(self.err("found unexpected token"));
                }
            }
        };
        Ok(Requirement { key, op })
    }
}

/// A field selector: `a=b`, `a==b`, `a!=b`, comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses and checks the fields against what the kind supports.
    pub fn parse(s: &str, supported: &[&str]) -> ApiResult<FieldSelector> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                let list: Vec<String> = supported.iter().map(|f| format!("{f:?}")).collect();
                return Err(ApiError::bad_request(format!(
                    "{field:?} is not a known field selector: only {}",
                    list.join(", ")
                )));
            }
            reqs.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// A single `metadata.name=x` requirement, if that is what this is.
    pub fn single_name(&self) -> Option<&str> {
        match self.reqs.as_slice() {
            [(f, true, v)] if f == "metadata.name" => Some(v),
            _ => None,
        }
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(field, eq, want)| {
            let have = field_value(obj, field);
            (have == *want) == *eq
        })
    }
}

/// The string value of a selectable field (missing fields read as "", booleans as
/// "true"/"false").
pub fn field_value(obj: &Value, field: &str) -> String {
    let ptr = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&ptr) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None => {
            // Fields upstream defaults when absent.
            match field {
                "spec.unschedulable" => "false".into(),
                _ => String::new(),
            }
        }
        Some(other) => other.to_string(),
    }
}

/// Field selectors each kind supports, beyond metadata.name and metadata.namespace.
pub fn supported_fields(group: &str, kind: &str) -> Vec<&'static str> {
    let mut v = vec!["metadata.name", "metadata.namespace"];
    v.extend_from_slice(match (group, kind) {
        ("", "Pod") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ][..],
        ("", "Event") | ("events.k8s.io", "Event") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ][..],
        ("", "Secret") => &["type"][..],
        ("", "Node") => &["spec.unschedulable"][..],
        ("", "Namespace") => &["status.phase"][..],
        ("", "ReplicationController") => &["status.replicas"][..],
        ("apps", "ReplicaSet") => &["status.replicas"][..],
        ("batch", "Job") => &["status.successful"][..],
        ("certificates.k8s.io", "CertificateSigningRequest") => &["spec.signerName"][..],
        _ => &[][..],
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors_support_every_operator() {
        let l = labels(&[("app", "web"), ("tier", "fe"), ("n", "5")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing!=x", true),
            ("app=web,tier=fe", true),
            ("app=web,tier=be", false),
            ("n>3", true),
            ("n<3", false),
            ("example.com/x notin (a)", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
        for bad in ["app=", "=x", "app in web", "a b", "app=we b", "-x=1"] {
            if bad == "app=" {
                // An empty value is valid upstream.
                assert!(LabelSelector::parse(bad).is_ok());
                continue;
            }
            assert!(LabelSelector::parse(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn field_selectors_check_supported_fields() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let f = supported_fields("", "Pod");
        assert!(
            FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed", &f)
                .unwrap()
                .matches(&pod)
        );
        assert!(!FieldSelector::parse("spec.nodeName=n2", &f)
            .unwrap()
            .matches(&pod));
        let e = FieldSelector::parse("spec.foo=x", &supported_fields("", "ConfigMap")).unwrap_err();
        assert_eq!(e.message, "\"spec.foo\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\"");
        assert_eq!(
            FieldSelector::parse("metadata.name=p", &f)
                .unwrap()
                .single_name(),
            Some("p")
        );
    }
}
