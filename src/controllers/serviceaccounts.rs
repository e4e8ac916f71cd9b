//! The service account controller and the root CA publisher: every namespace that is not
//! terminating has a `default` ServiceAccount (re-created when deleted) and the `kube-root-ca.crt`
//! ConfigMap holding the cluster CA under `ca.crt` (restored when changed or deleted), as
//! upstream's `serviceaccount-controller` and `root-ca-cert-publisher` keep them.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::status::ApiResult;
use crate::controllers::client::{is_terminating, name_of, namespace_of, Client};
use crate::controllers::informer::Informer;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
pub const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";
pub const ROOT_CA_KEY: &str = "ca.crt";
const DESCRIPTION_ANNOTATION: &str = "kubernetes.io/description";
const DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.";

/// What a namespace needs.
#[derive(Debug, PartialEq)]
pub enum Action {
    CreateServiceAccount,
    CreateRootCa,
    /// Replace the ConfigMap with this (its data and description restored).
    UpdateRootCa(Value),
}

fn root_ca_data(ca_pem: &str) -> Value {
    json!({ ROOT_CA_KEY: ca_pem })
}

/// The decision for one namespace from what the informers hold.
pub fn plan(
    namespace: Option<&Value>,
    default_sa: Option<&Value>,
    root_ca: Option<&Value>,
    ca_pem: Option<&str>,
) -> Vec<Action> {
    let Some(ns) = namespace else {
        return Vec::new();
    };
    if is_terminating(ns)
        || ns.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating")
    {
        return Vec::new();
    }
    let mut actions = Vec::new();
    if default_sa.is_none_or(is_terminating) {
        actions.push(Action::CreateServiceAccount);
    }
    if let Some(ca) = ca_pem {
        let data = root_ca_data(ca);
        match root_ca {
            None => actions.push(Action::CreateRootCa),
            Some(cm) => {
                let described = cm
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(DESCRIPTION_ANNOTATION))
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.is_empty());
                if cm["data"] != data || !described {
                    let mut cm = cm.clone();
                    cm["data"] = data;
                    if !cm["metadata"]["annotations"].is_object() {
                        cm["metadata"]["annotations"] = json!({});
                    }
                    cm["metadata"]["annotations"][DESCRIPTION_ANNOTATION] = json!(DESCRIPTION);
                    actions.push(Action::UpdateRootCa(cm));
                }
            }
        }
    }
    actions
}

struct Controller {
    client: Client,
    namespaces: Arc<Informer>,
    service_accounts: Arc<Informer>,
    config_maps: Arc<Informer>,
}

/// Writes that lost to a concurrent one or to namespace termination are not failures.
fn tolerated(code: u16) -> bool {
    matches!(code, 403 | 404 | 409)
}

impl Controller {
    async fn sync(&self, ns: String) -> ApiResult<Option<Duration>> {
        let namespace = self.namespaces.get(&ns);
        let sa = self
            .service_accounts
            .get(&format!("{ns}/{DEFAULT_SERVICE_ACCOUNT}"));
        let cm = self.config_maps.get(&format!("{ns}/{ROOT_CA_CONFIG_MAP}"));
        let ca = self.client.st.tokens.get().map(|i| i.ca_pem.as_str());
        for action in plan(namespace.as_deref(), sa.as_deref(), cm.as_deref(), ca) {
            let r = match action {
                Action::CreateServiceAccount => {
                    let obj = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                                     "metadata": {"name": DEFAULT_SERVICE_ACCOUNT}});
                    self.client
                        .create(&self.service_accounts.def, Some(&ns), obj)
                        .await
                }
                Action::CreateRootCa => {
                    let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": ROOT_CA_CONFIG_MAP,
                                     "annotations": {DESCRIPTION_ANNOTATION: DESCRIPTION}},
                        "data": root_ca_data(ca.unwrap_or_default())});
                    self.client
                        .create(&self.config_maps.def, Some(&ns), obj)
                        .await
                }
                Action::UpdateRootCa(cm) => {
                    self.client
                        .update(&self.config_maps.def, Some(&ns), cm)
                        .await
                }
            };
            match r {
                Ok(_) => {}
                // A stale ConfigMap: look again once the informer caught up.
                Err(e) if e.code == 409 && e.reason == "Conflict" => return Err(e),
                Err(e) if tolerated(e.code) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("kube-controller-manager");
    let c = Arc::new(Controller {
        namespaces: ctx.informers.get(&client.def("", "v1", "namespaces")),
        service_accounts: ctx.informers.get(&client.def("", "v1", "serviceaccounts")),
        config_maps: ctx.informers.get(&client.def("", "v1", "configmaps")),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut ns_rx = c.namespaces.subscribe();
            let mut sa_rx = c.service_accounts.subscribe();
            let mut cm_rx = c.config_maps.subscribe();
            c.namespaces.wait_synced().await;
            c.service_accounts.wait_synced().await;
            c.config_maps.wait_synced().await;
            for ns in c.namespaces.list() {
                queue.add(name_of(&ns).to_string());
            }
            loop {
                tokio::select! {
                    Some(ch) = ns_rx.recv() => queue.add(name_of(ch.object()).to_string()),
                    Some(ch) = sa_rx.recv() => {
                        let sa = ch.object();
                        if name_of(sa) == DEFAULT_SERVICE_ACCOUNT {
                            queue.add(namespace_of(sa).to_string());
                        }
                    }
                    Some(ch) = cm_rx.recv() => {
                        let cm = ch.object();
                        if name_of(cm) == ROOT_CA_CONFIG_MAP {
                            queue.add(namespace_of(cm).to_string());
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    tasks.extend(spawn_workers(
        queue,
        2,
        "serviceaccount-controller",
        move |ns| {
            let c = c.clone();
            async move { c.sync(ns).await }
        },
    ));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(status: &str) -> Value {
        json!({"metadata": {"name": "n"}, "status": {"phase": status}})
    }

    fn root_ca(data: Value) -> Value {
        json!({"metadata": {"name": ROOT_CA_CONFIG_MAP, "namespace": "n", "resourceVersion": "7",
                            "annotations": {DESCRIPTION_ANNOTATION: DESCRIPTION}},
               "data": data})
    }

    #[test]
    fn a_new_namespace_gets_the_default_account_and_the_root_ca() {
        assert_eq!(
            plan(Some(&ns("Active")), None, None, Some("PEM")),
            vec![Action::CreateServiceAccount, Action::CreateRootCa]
        );
        let sa = json!({"metadata": {"name": "default"}});
        let cm = root_ca(json!({"ca.crt": "PEM"}));
        assert_eq!(
            plan(Some(&ns("Active")), Some(&sa), Some(&cm), Some("PEM")),
            vec![]
        );
    }

    #[test]
    fn terminating_or_missing_namespaces_are_left_alone() {
        assert_eq!(plan(None, None, None, Some("PEM")), vec![]);
        assert_eq!(
            plan(Some(&ns("Terminating")), None, None, Some("PEM")),
            vec![]
        );
        let deleting =
            json!({"metadata": {"name": "n", "deletionTimestamp": "2026-01-01T00:00:00Z"}});
        assert_eq!(plan(Some(&deleting), None, None, Some("PEM")), vec![]);
    }

    #[test]
    fn a_changed_root_ca_is_restored_keeping_the_rest() {
        let mut cm = root_ca(json!({"ca.crt": "tampered", "extra": "x"}));
        cm["metadata"]["labels"] = json!({"keep": "me"});
        let sa = json!({"metadata": {"name": "default"}});
        let actions = plan(Some(&ns("Active")), Some(&sa), Some(&cm), Some("PEM"));
        let [Action::UpdateRootCa(fixed)] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(fixed["data"], json!({"ca.crt": "PEM"}));
        assert_eq!(fixed["metadata"]["labels"], json!({"keep": "me"}));
        assert_eq!(
            fixed["metadata"]["resourceVersion"], "7",
            "an optimistic update"
        );
        // A missing description alone is restored too.
        let mut bare = root_ca(json!({"ca.crt": "PEM"}));
        bare["metadata"]["annotations"] = json!({});
        assert!(matches!(
            plan(Some(&ns("Active")), Some(&sa), Some(&bare), Some("PEM")).as_slice(),
            [Action::UpdateRootCa(_)]
        ));
    }
}
