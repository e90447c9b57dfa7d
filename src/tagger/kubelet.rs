//! The kubelet provider: the pods of this node from the kubelet's `/pods`, and their tags as
//! the Agent's tagger gives them (pod tags, and for each container the pod's plus its own).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{image_tags, Entities, EntityTags};

/// Where the kubelet is and how to talk to it (the Agent's settings of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletConfig {
    pub host: String,
    /// `DD_KUBERNETES_HTTPS_KUBELET_PORT`; 0 asks over HTTPS never.
    pub https_port: u16,
    /// `DD_KUBERNETES_HTTP_KUBELET_PORT`; 0 never falls back to plain HTTP.
    pub http_port: u16,
    /// A bearer token for HTTPS, read at each request (service-account tokens rotate).
    pub token_path: PathBuf,
    /// The CA that signed the kubelet's certificate; the built-in roots when it is absent.
    pub ca_path: PathBuf,
    /// `DD_KUBELET_TLS_VERIFY`.
    pub tls_verify: bool,
}

/// Largest `/pods` answer read: a node's pods in JSON are a few MiB at most.
const MAX_ANSWER: u64 = 64 << 20;

/// Asks the kubelet for its pods: over HTTPS first, then plain HTTP, as the Agent does.
pub fn fetch(k: &KubeletConfig, timeout: Duration) -> Result<Entities, String> {
    let mut errors = Vec::new();
    if k.https_port != 0 {
        match get_https(k, timeout) {
            Ok(body) => return pods(&body),
            Err(e) => errors.push(format!("https port {}: {e}", k.https_port)),
        }
    }
    if k.http_port != 0 {
        let url = format!("http://{}:{}/pods", host(&k.host), k.http_port);
        match get(&agent(timeout, None), &url, None) {
            Ok(body) => return pods(&body),
            Err(e) => errors.push(format!("http port {}: {e}", k.http_port)),
        }
    }
    if errors.is_empty() {
        errors.push("both ports are 0".into());
    }
    Err(format!("kubelet at {}: {}", k.host, errors.join("; ")))
}

/// A host for a URL: an IPv6 address goes in brackets.
fn host(h: &str) -> String {
    if h.contains(':') && !h.starts_with('[') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

fn get_https(k: &KubeletConfig, timeout: Duration) -> Result<Vec<u8>, String> {
    use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder().disable_verification(!k.tls_verify);
    if k.tls_verify {
        if let Ok(pem) = std::fs::read(&k.ca_path) {
            let certs: Vec<_> = parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(format!("{} holds no certificate", k.ca_path.display()));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
    }
    let token = std::fs::read_to_string(&k.token_path)
        .ok()
        .map(|t| t.trim().to_string());
    let url = format!("https://{}:{}/pods", host(&k.host), k.https_port);
    get(&agent(timeout, Some(tls.build())), &url, token.as_deref())
}

fn agent(timeout: Duration, tls: Option<ureq::tls::TlsConfig>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0);
    if let Some(tls) = tls {
        config = config.tls_config(tls);
    }
    config.build().into()
}

fn get(agent: &ureq::Agent, url: &str, token: Option<&str>) -> Result<Vec<u8>, String> {
    let mut request = agent.get(url);
    if let Some(t) = token {
        request = request.header("Authorization", &format!("Bearer {t}"));
    }
    let mut response = request.call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(format!("answered HTTP {status}"));
    }
    response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

/// The tags of every pod and container in a `/pods` answer.
pub fn pods(body: &[u8]) -> Result<Entities, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("/pods is not JSON: {e}"))?;
    let items = v["items"].as_array().ok_or("/pods has no items list")?;
    let mut out = Entities::default();
    for pod in items {
        let uid = str_of(&pod["metadata"]["uid"]);
        if uid.is_empty() {
            continue;
        }
        let tags = pod_tags(pod);
        let statuses = ["containerStatuses", "initContainerStatuses"]
            .iter()
            .flat_map(|k| pod["status"][k].as_array().into_iter().flatten());
        for c in statuses {
            // "containerd://<id>", "docker://<id>", "cri-o://<id>"
            let raw = str_of(&c["containerID"]);
            let id = raw.split_once("://").map_or(raw, |(_, id)| id);
            if id.is_empty() {
                continue;
            }
            let container = container_tags(pod, c, id, tags.clone());
            out.containers.insert(id.into(), container);
        }
        out.pods.insert(uid.into(), tags);
    }
    Ok(out)
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// The Agent's `tags.datadoghq.com/` standard labels and `app.kubernetes.io/` labels.
const POD_LABELS: [(&str, &str); 9] = [
    ("tags.datadoghq.com/env", "env"),
    ("tags.datadoghq.com/service", "service"),
    ("tags.datadoghq.com/version", "version"),
    ("app.kubernetes.io/name", "kube_app_name"),
    ("app.kubernetes.io/instance", "kube_app_instance"),
    ("app.kubernetes.io/version", "kube_app_version"),
    ("app.kubernetes.io/component", "kube_app_component"),
    ("app.kubernetes.io/part-of", "kube_app_part_of"),
    ("app.kubernetes.io/managed-by", "kube_app_managed_by"),
];

fn pod_tags(pod: &Value) -> EntityTags {
    let meta = &pod["metadata"];
    let mut t = EntityTags::default();
    t.low("kube_namespace", str_of(&meta["namespace"]));
    t.low("pod_phase", &str_of(&pod["status"]["phase"]).to_lowercase());
    t.low(
        "kube_priority_class",
        str_of(&pod["spec"]["priorityClassName"]),
    );
    t.low("kube_qos", str_of(&pod["status"]["qosClass"]));
    t.low(
        "kube_runtime_class",
        str_of(&pod["spec"]["runtimeClassName"]),
    );
    for (label, tag) in POD_LABELS {
        t.low(tag, str_of(&meta["labels"][label]));
    }
    t.orchestrator("pod_name", str_of(&meta["name"]));
    for owner in meta["ownerReferences"].as_array().into_iter().flatten() {
        let (kind, name) = (str_of(&owner["kind"]), str_of(&owner["name"]));
        t.low("kube_ownerref_kind", &kind.to_lowercase());
        t.orchestrator("kube_ownerref_name", name);
        owner_tags(&mut t, kind, name);
    }
    t
}

/// What an owner reference says of the workload, as the Agent reads it.
fn owner_tags(t: &mut EntityTags, kind: &str, name: &str) {
    match kind {
        "Deployment" => t.low("kube_deployment", name),
        "DaemonSet" => t.low("kube_daemon_set", name),
        "StatefulSet" => t.low("kube_stateful_set", name),
        "ReplicationController" => t.low("kube_replication_controller", name),
        "Job" => match cronjob_of(name) {
            Some(cronjob) => {
                t.orchestrator("kube_job", name);
                t.low("kube_cronjob", cronjob);
            }
            None => t.low("kube_job", name),
        },
        "ReplicaSet" => {
            if let Some(deployment) = deployment_of(name) {
                t.low("kube_deployment", deployment);
            }
            t.low("kube_replica_set", name);
        }
        _ => {}
    }
}

/// The Deployment of a ReplicaSet `<deployment>-<hash>`: the hash is 3 or more characters of
/// the alphabet Kubernetes draws pod-template hashes from.
pub(crate) fn deployment_of(replica_set: &str) -> Option<&str> {
    let (deployment, hash) = replica_set.rsplit_once('-')?;
    let alphabet = |b: u8| b"bcdfghjklmnpqrstvwxz2456789".contains(&b);
    (hash.len() >= 3 && hash.bytes().all(alphabet)).then_some(deployment)
}

/// The CronJob of a Job `<cronjob>-<scheduled minute>`.
pub(crate) fn cronjob_of(job: &str) -> Option<&str> {
    let (cronjob, minute) = job.rsplit_once('-')?;
    (!minute.is_empty() && minute.bytes().all(|b| b.is_ascii_digit())).then_some(cronjob)
}

fn container_tags(pod: &Value, c: &Value, id: &str, mut t: EntityTags) -> EntityTags {
    let name = str_of(&c["name"]);
    let pod_name = str_of(&pod["metadata"]["name"]);
    t.low("kube_container_name", name);
    image_tags(&mut t, str_of(&c["image"]));
    t.low("image_id", str_of(&c["imageID"]));
    let labels = &pod["metadata"]["labels"];
    for key in ["env", "service", "version"] {
        t.low(
            key,
            str_of(&labels[format!("tags.datadoghq.com/{name}.{key}")]),
        );
    }
    t.high("container_id", id);
    if !name.is_empty() && !pod_name.is_empty() {
        t.high("display_container_name", &format!("{name}_{pod_name}"));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tagger::Cardinality;

    #[test]
    fn workloads_come_from_owner_names() {
        assert_eq!(deployment_of("web-7d4b9c8f6d"), Some("web"));
        assert_eq!(deployment_of("my-app-5x"), None);
        assert_eq!(deployment_of("web-abcde"), None); // vowels are not in the alphabet
        assert_eq!(cronjob_of("backup-28100000"), Some("backup"));
        assert_eq!(cronjob_of("migrate"), None);
    }

    #[test]
    fn a_pod_and_its_containers_get_the_agents_tags() {
        let body = br#"{"items":[{
            "metadata":{"uid":"pod-1","name":"web-7d4b9c8f6d-x2x9z","namespace":"shop",
                "labels":{"tags.datadoghq.com/env":"prod","tags.datadoghq.com/app.version":"1.2"},
                "ownerReferences":[{"kind":"ReplicaSet","name":"web-7d4b9c8f6d"}]},
            "spec":{},
            "status":{"phase":"Running","qosClass":"Burstable","containerStatuses":[
                {"name":"app","containerID":"containerd://abc123","image":"docker.io/shop/web:1.2","imageID":"sha256:ff"},
                {"name":"pending","containerID":"","image":"x"}]}}]}"#;
        let s = pods(body).unwrap();
        let pod = &s.pods["pod-1"];
        assert_eq!(
            pod.at(Cardinality::Orchestrator).collect::<Vec<_>>(),
            [
                "kube_namespace:shop",
                "pod_phase:running",
                "kube_qos:Burstable",
                "env:prod",
                "kube_ownerref_kind:replicaset",
                "kube_deployment:web",
                "kube_replica_set:web-7d4b9c8f6d",
                "pod_name:web-7d4b9c8f6d-x2x9z",
                "kube_ownerref_name:web-7d4b9c8f6d",
            ]
        );
        let c = &s.containers["abc123"];
        assert_eq!(
            c.high.iter().map(|t| &**t).collect::<Vec<_>>(),
            [
                "container_id:abc123",
                "display_container_name:app_web-7d4b9c8f6d-x2x9z"
            ]
        );
        assert_eq!(
            c.low[c.low.len() - 6..]
                .iter()
                .map(|t| &**t)
                .collect::<Vec<_>>(),
            [
                "kube_container_name:app",
                "image_name:docker.io/shop/web",
                "short_image:web",
                "image_tag:1.2",
                "image_id:sha256:ff",
                "version:1.2",
            ]
        );
        assert_eq!(s.containers.len(), 1);
        assert!(pods(b"{}").is_err());
        assert!(pods(b"not json").is_err());
    }
}
