//! API errors and the one function that turns them into Kubernetes `Status` responses.

use serde_json::{json, Value};

/// One field-level cause of an error (`details.causes[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub reason: String,
    pub message: String,
    pub field: String,
}

impl Cause {
    pub fn new(reason: &str, field: impl Into<String>, message: impl Into<String>) -> Cause {
        Cause {
            reason: reason.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
    /// `FieldValueInvalid`: `Invalid value: <value>: <detail>`.
    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Cause {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            Value::Null => "null".into(),
            other => other.to_string(),
        };
        Cause::new(
            "FieldValueInvalid",
            field,
            format!("Invalid value: {shown}: {detail}"),
        )
    }
    /// `FieldValueRequired`: `Required value`.
    pub fn required(field: impl Into<String>, detail: &str) -> Cause {
        let msg = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Cause::new("FieldValueRequired", field, msg)
    }
    /// `FieldValueForbidden`: `Forbidden: <detail>`.
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Cause {
        Cause::new("FieldValueForbidden", field, format!("Forbidden: {detail}"))
    }
    /// `FieldValueNotSupported`: `Unsupported value: "x": supported values: "a", "b"`.
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Cause {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Cause::new(
            "FieldValueNotSupported",
            field,
            format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        )
    }
    /// `FieldValueDuplicate`.
    pub fn duplicate(field: impl Into<String>, value: &Value) -> Cause {
        Cause::new(
            "FieldValueDuplicate",
            field,
            format!("Duplicate value: {value}"),
        )
    }
}

/// An API error, as upstream reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub name: Option<String>,
    pub group: Option<String>,
    pub kind: Option<String>,
    pub causes: Vec<Cause>,
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            name: None,
            group: None,
            kind: None,
            causes: Vec::new(),
            retry_after: None,
        }
    }

    fn with_details(mut self, name: &str, group: &str, kind: &str) -> ApiError {
        self.name = Some(name.to_string()).filter(|s| !s.is_empty());
        self.group = Some(group.to_string()).filter(|s| !s.is_empty());
        self.kind = Some(kind.to_string());
        self
    }

    /// `pods "x" not found`; `qualified` is `pods` or `deployments.apps`.
    pub fn not_found(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(group, plural)),
        )
        .with_details(name, group, plural)
    }

    pub fn already_exists(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(group, plural)),
        )
        .with_details(name, group, plural)
    }

    pub fn conflict(group: &str, plural: &str, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(group, plural)
            ),
        )
        .with_details(name, group, plural)
    }

    pub fn stale(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::conflict(
            group,
            plural,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422: `The ConfigMap "x" is invalid: metadata.name: Invalid value: …`.
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> ApiError {
        let list: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let kind_q = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let mut e = ApiError::new(
            422,
            "Invalid",
            format!("{kind_q} \"{name}\" is invalid: {joined}"),
        )
        .with_details(name, group, kind);
        e.causes = causes;
        e
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(403, "Forbidden", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn method_not_supported(group: &str, plural: &str, verb: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "{verb} is not supported on resources of kind \"{}\"",
                qualified(group, plural)
            ),
        )
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(413, "RequestEntityTooLarge", message)
    }

    pub fn unsupported_media_type(ct: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf{}", if ct.is_empty() { String::new() } else { format!(" (got {ct})") }),
        )
    }

    pub fn not_acceptable(message: impl Into<String>) -> ApiError {
        ApiError::new(406, "NotAcceptable", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    pub fn timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(504, "Timeout", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(503, "ServiceUnavailable", message);
        e.retry_after = Some(1);
        e
    }

    /// The `Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if self.name.is_some()
            || self.kind.is_some()
            || !self.causes.is_empty()
            || self.retry_after.is_some()
        {
            let mut details = serde_json::Map::new();
            if let Some(n) = &self.name {
                details.insert("name".into(), json!(n));
            }
            if let Some(g) = &self.group {
                details.insert("group".into(), json!(g));
            }
            if let Some(k) = &self.kind {
                details.insert("kind".into(), json!(k));
            }
            if !self.causes.is_empty() {
                details.insert(
                    "causes".into(),
                    Value::Array(
                        self.causes
                            .iter()
                            .map(|c| {
                                let mut m = serde_json::Map::new();
                                m.insert("reason".into(), json!(c.reason));
                                m.insert("message".into(), json!(c.message));
                                if !c.field.is_empty() {
                                    m.insert("field".into(), json!(c.field));
                                }
                                Value::Object(m)
                            })
                            .collect(),
                    ),
                );
            }
            if let Some(s) = self.retry_after {
                details.insert("retryAfterSeconds".into(), json!(s));
            }
            status["details"] = Value::Object(details);
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl From<k3rs_storage::Error> for ApiError {
    fn from(e: k3rs_storage::Error) -> ApiError {
        use k3rs_storage::Error as E;
        match e {
            E::Compacted {
                requested,
                compact_revision,
            } => ApiError::gone(format!(
                "too old resource version: {requested} ({compact_revision})"
            )),
            E::RequestTooLarge { .. } => ApiError::too_large(e.to_string()),
            E::NotLeader { .. } | E::ShuttingDown => ApiError::unavailable(e.to_string()),
            other => ApiError::internal(format!("storage: {other}")),
        }
    }
}

/// `pods` or `deployments.apps`.
pub fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// A success `Status` (deletecollection of some kinds, exec results).
pub fn success_status(details: Option<Value>) -> Value {
    let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_upstream() {
        let e = ApiError::not_found("apps", "deployments", "web");
        assert_eq!(e.message, "deployments.apps \"web\" not found");
        let s = e.to_status();
        assert_eq!(s["details"]["kind"], "deployments");
        assert_eq!(s["details"]["group"], "apps");
        assert_eq!(s["code"], 404);
        let e = ApiError::invalid(
            "",
            "ConfigMap",
            "Bad_Name",
            vec![Cause::invalid("metadata.name", &json!("Bad_Name"), "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'")],
        );
        assert!(e.message.starts_with("ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase"));
        assert_eq!(
            e.to_status()["details"]["causes"][0]["field"],
            "metadata.name"
        );
        assert_eq!(
            ApiError::stale("", "configmaps", "x").message,
            "Operation cannot be fulfilled on configmaps \"x\": the object has been modified; please apply your changes to the latest version and try again"
        );
    }
}
