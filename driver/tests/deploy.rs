//! The deploy files, read the way Kubernetes and the plugin will read them.
//!
//! - Every manifest in `deploy/` (the chart rendered with its defaults) and
//!   `deploy/examples/` parses into typed Kubernetes objects (k8s-openapi), with unknown
//!   fields as errors: a misspelt key that the API server would silently drop fails here.
//! - The plugin's arguments in the DaemonSet exist in `qcow2-csi serve --help`, and those
//!   arguments start a plugin that answers Probe.
//! - The driver name, topology key, socket path and StorageClass parameters match the code.
//! - With the tools venv (`hack/test-deps.sh`): `deploy/` equals the chart's rendering, the
//!   chart lints and its schema refuses bad values, `kubernetes-validate --strict` accepts the
//!   manifests, hadolint accepts the Dockerfile, shellcheck the scripts. Each check is also
//!   shown failing on a deliberately broken input.

#[allow(dead_code)]
#[path = "support/csi.rs"]
mod csi;
#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use csi::Plugin;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass, VolumeAttributesClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use qcow2_csi::csi::{DRIVER_NAME, TOPOLOGY_KEY};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// The manifests users apply: the rendered chart and the examples.
fn manifest_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["deploy", "deploy/examples"] {
        let mut here: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        here.sort();
        files.extend(here);
    }
    assert!(files.len() >= 7, "{files:?}");
    files
}

/// The YAML documents of a multi-document stream (empty ones dropped).
fn documents(text: &str) -> Result<Vec<Value>, String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Deserializes `doc` as `T`; any field `T` does not know is an error naming its path.
fn strict<T: DeserializeOwned>(doc: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut note = |p: serde_ignored::Path<'_>| unknown.push(p.to_string().replace(".?", ""));
    let de = serde_ignored::Deserializer::new(doc.clone(), &mut note);
    let typed: T = serde_path_to_error::deserialize(de)
        .map_err(|e| format!("at {}: {}", e.path(), e.inner()))?;
    if unknown.is_empty() {
        Ok(typed)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

/// snapshot.storage.k8s.io/v1 VolumeSnapshotClass (a CRD: not in k8s-openapi). Fields no
/// test reads are still checked by deserializing them.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeSnapshotClass {
    api_version: SnapshotApi,
    kind: String,
    metadata: ObjectMeta,
    driver: String,
    deletion_policy: DeletionPolicy,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
}

/// groupsnapshot.storage.k8s.io/v1beta2 VolumeGroupSnapshotClass (a CRD).
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeGroupSnapshotClass {
    api_version: GroupSnapshotApi,
    kind: String,
    metadata: ObjectMeta,
    driver: String,
    deletion_policy: DeletionPolicy,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
}

/// groupsnapshot.storage.k8s.io/v1beta2 VolumeGroupSnapshot.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeGroupSnapshot {
    api_version: GroupSnapshotApi,
    kind: String,
    metadata: ObjectMeta,
    spec: VolumeGroupSnapshotSpec,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeGroupSnapshotSpec {
    volume_group_snapshot_class_name: Option<String>,
    source: VolumeGroupSnapshotSource,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeGroupSnapshotSource {
    selector: Option<LabelSelector>,
    volume_group_snapshot_content_name: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
enum GroupSnapshotApi {
    #[serde(rename = "groupsnapshot.storage.k8s.io/v1beta2")]
    V1beta2,
}

/// snapshot.storage.k8s.io/v1 VolumeSnapshot.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeSnapshot {
    api_version: SnapshotApi,
    kind: String,
    metadata: ObjectMeta,
    spec: VolumeSnapshotSpec,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeSnapshotSpec {
    volume_snapshot_class_name: Option<String>,
    source: VolumeSnapshotSource,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeSnapshotSource {
    persistent_volume_claim_name: Option<String>,
    volume_snapshot_content_name: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
enum SnapshotApi {
    #[serde(rename = "snapshot.storage.k8s.io/v1")]
    V1,
}

#[derive(Debug, serde::Deserialize)]
enum DeletionPolicy {
    Delete,
    Retain,
}

/// monitoring.coreos.com/v1 (the Prometheus Operator's CRDs: not in k8s-openapi). The
/// fields the chart uses, named as the CRDs' schemas name them; any other is an error.
#[derive(Debug, serde::Deserialize)]
enum MonitoringApi {
    #[serde(rename = "monitoring.coreos.com/v1")]
    V1,
}

/// A duration as the CRDs' schemas allow it (`30s`, `1m30s`, `500ms`).
#[derive(Debug)]
struct PromDuration(#[allow(dead_code)] String);

impl<'de> serde::Deserialize<'de> for PromDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut rest = s.as_str();
        let mut parts = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let unit = ["ms", "y", "w", "d", "h", "m", "s"]
                .into_iter()
                .find(|u| rest[digits..].starts_with(u));
            match unit {
                Some(u) if digits > 0 => rest = &rest[digits + u.len()..],
                _ => return Err(serde::de::Error::custom(format!("{s:?} is not a duration"))),
            }
            parts += 1;
        }
        if parts == 0 {
            return Err(serde::de::Error::custom("an empty duration"));
        }
        Ok(PromDuration(s))
    }
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: MonitoringApi,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    namespace_selector: Option<NamespaceSelector>,
    endpoints: Vec<ScrapeEndpoint>,
    job_label: Option<String>,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    any: Option<bool>,
    match_names: Option<Vec<String>>,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScrapeEndpoint {
    port: Option<String>,
    path: Option<String>,
    interval: Option<PromDuration>,
    scrape_timeout: Option<PromDuration>,
    relabelings: Option<Vec<Relabeling>>,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Option<Vec<String>>,
    target_label: Option<String>,
    action: Option<String>,
    regex: Option<String>,
    replacement: Option<String>,
    separator: Option<String>,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrometheusRule {
    api_version: MonitoringApi,
    kind: String,
    metadata: ObjectMeta,
    spec: PrometheusRuleSpec,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    interval: Option<PromDuration>,
    rules: Vec<Rule>,
}

#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<PromDuration>,
    keep_firing_for: Option<PromDuration>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

/// One typed manifest object.
#[derive(Debug)]
#[allow(dead_code)]
enum Object {
    Namespace(Box<Namespace>),
    CSIDriver(Box<CSIDriver>),
    DaemonSet(Box<DaemonSet>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    StorageClass(Box<StorageClass>),
    VolumeAttributesClass(Box<VolumeAttributesClass>),
    VolumeSnapshotClass(Box<VolumeSnapshotClass>),
    VolumeGroupSnapshotClass(Box<VolumeGroupSnapshotClass>),
    VolumeGroupSnapshot(Box<VolumeGroupSnapshot>),
    PersistentVolumeClaim(Box<PersistentVolumeClaim>),
    Pod(Box<Pod>),
    Secret(Box<Secret>),
    VolumeSnapshot(Box<VolumeSnapshot>),
    Service(Box<Service>),
    ConfigMap(Box<ConfigMap>),
    ServiceMonitor(Box<ServiceMonitor>),
    PrometheusRule(Box<PrometheusRule>),
}

/// Dispatches on `kind` (the typed deserializers check `apiVersion` too).
fn typed(doc: &Value) -> Result<Object, String> {
    let kind = doc["kind"].as_str().ok_or("no kind")?;
    Ok(match kind {
        "Namespace" => Object::Namespace(strict(doc)?),
        "CSIDriver" => Object::CSIDriver(strict(doc)?),
        "DaemonSet" => Object::DaemonSet(strict(doc)?),
        "ServiceAccount" => Object::ServiceAccount(strict(doc)?),
        "ClusterRole" => Object::ClusterRole(strict(doc)?),
        "ClusterRoleBinding" => Object::ClusterRoleBinding(strict(doc)?),
        "Role" => Object::Role(strict(doc)?),
        "RoleBinding" => Object::RoleBinding(strict(doc)?),
        "StorageClass" => Object::StorageClass(strict(doc)?),
        "VolumeAttributesClass" => Object::VolumeAttributesClass(strict(doc)?),
        "VolumeSnapshotClass" => Object::VolumeSnapshotClass(strict(doc)?),
        "VolumeGroupSnapshotClass" => Object::VolumeGroupSnapshotClass(strict(doc)?),
        "VolumeGroupSnapshot" => Object::VolumeGroupSnapshot(strict(doc)?),
        "PersistentVolumeClaim" => Object::PersistentVolumeClaim(strict(doc)?),
        "Pod" => Object::Pod(strict(doc)?),
        "Secret" => Object::Secret(strict(doc)?),
        "VolumeSnapshot" => Object::VolumeSnapshot(strict(doc)?),
        "Service" => Object::Service(strict(doc)?),
        "ConfigMap" => Object::ConfigMap(strict(doc)?),
        "ServiceMonitor" => Object::ServiceMonitor(strict(doc)?),
        "PrometheusRule" => Object::PrometheusRule(strict(doc)?),
        other => {
            return Err(format!(
                "kind {other} is not one the deploy files should hold"
            ));
        }
    })
}

/// The typed objects of a manifest stream; panics at the first error, naming `origin` and
/// the document.
fn objects_of(text: &str, origin: &str) -> Vec<Object> {
    documents(text)
        .unwrap_or_else(|e| panic!("{origin}: {e}"))
        .iter()
        .enumerate()
        .map(|(i, d)| typed(d).unwrap_or_else(|e| panic!("{origin} document {}: {e}", i + 1)))
        .collect()
}

/// Every object of every manifest file, with its file.
fn all_objects() -> Vec<(PathBuf, Object)> {
    let mut out = Vec::new();
    for file in manifest_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for obj in objects_of(&text, &file.display().to_string()) {
            out.push((file.clone(), obj));
        }
    }
    out
}

/// The rendered chart's objects.
fn chart_objects() -> Vec<Object> {
    let text = std::fs::read_to_string(root().join("deploy/qcow2-csi.yaml")).unwrap();
    objects_of(&text, "deploy/qcow2-csi.yaml")
}

fn daemonset() -> DaemonSet {
    chart_objects()
        .into_iter()
        .find_map(|o| match o {
            Object::DaemonSet(d) => Some(*d),
            _ => None,
        })
        .expect("the chart renders a DaemonSet")
}

fn container<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn serve_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The `--flags` in `args` that `help` does not list.
fn flags_missing_from(help: &str, args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .filter(|flag| {
            !help
                .split_whitespace()
                .any(|w| w.trim_end_matches(',') == flag)
        })
        .collect()
}

fn plugin_args() -> Vec<String> {
    let ds = daemonset();
    let args = container(&ds, "qcow2-csi").args.clone().unwrap();
    assert_eq!(args[0], "serve", "{args:?}");
    args[1..].to_vec()
}

#[test]
fn every_manifest_parses_into_typed_objects_without_unknown_fields() {
    let objects = all_objects();
    let kinds: Vec<&str> = objects
        .iter()
        .map(|(_, o)| match o {
            Object::CSIDriver(_) => "CSIDriver",
            Object::DaemonSet(_) => "DaemonSet",
            Object::StorageClass(_) => "StorageClass",
            Object::VolumeAttributesClass(_) => "VolumeAttributesClass",
            Object::VolumeSnapshotClass(_) => "VolumeSnapshotClass",
            Object::VolumeSnapshot(_) => "VolumeSnapshot",
            Object::VolumeGroupSnapshot(_) => "VolumeGroupSnapshot",
            Object::PersistentVolumeClaim(_) => "PersistentVolumeClaim",
            Object::Pod(_) => "Pod",
            _ => "other",
        })
        .collect();
    for kind in [
        "CSIDriver",
        "DaemonSet",
        "StorageClass",
        "VolumeAttributesClass",
        "VolumeSnapshotClass",
        "VolumeSnapshot",
        "VolumeGroupSnapshot",
        "PersistentVolumeClaim",
        "Pod",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in the deploy files");
    }
}

#[test]
fn a_misspelt_mistyped_or_misversioned_field_is_an_error() {
    let text = std::fs::read_to_string(root().join("deploy/qcow2-csi.yaml")).unwrap();
    let docs = documents(&text).unwrap();
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap().clone();

    let mut driver = find("CSIDriver");
    assert!(typed(&driver).is_ok());
    driver["spec"]["attachRequird"] = Value::Bool(false);
    let e = typed(&driver).unwrap_err();
    assert!(e.contains("spec.attachRequird"), "{e}");

    let mut ds = find("DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always".into();
    let e = typed(&ds).unwrap_err();
    assert!(e.contains("imagePullPolicyy"), "{e}");
    let mut ds = find("DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["args"] = "serve".into();
    let e = typed(&ds).unwrap_err();
    assert!(e.contains("spec.template.spec.containers[0].args"), "{e}");

    let mut driver = find("CSIDriver");
    driver["apiVersion"] = "storage.k8s.io/v1beta1".into();
    assert!(typed(&driver).unwrap_err().contains("v1beta1"));

    let mut class = find("VolumeSnapshotClass");
    class["deletionPolicy"] = "Keep".into();
    assert!(typed(&class).is_err());
    let mut class = find("VolumeSnapshotClass");
    class["parameter"] = serde_json::json!({});
    assert!(typed(&class).unwrap_err().contains("parameter"));
}

/// Encrypted classes name Secrets the examples make, holding a passphrase, in namespaces
/// where a Role lets the plugin's ServiceAccount (the csi-provisioner's) get them. A
/// namespace of `${pvc.namespace}` is the claim's: objects of the file without one.
fn check_encrypted_classes(objects: &[(PathBuf, Object)]) {
    let mut encrypted = 0;
    for (file, obj) in objects {
        let Object::StorageClass(c) = obj else {
            continue;
        };
        let params = c.parameters.clone().unwrap_or_default();
        if params.get("encrypted").map(String::as_str) != Some("true") {
            continue;
        }
        encrypted += 1;
        let at = file.display();
        for who in ["provisioner", "node-stage"] {
            let get = |k: &str| {
                params
                    .get(&format!("csi.storage.k8s.io/{who}-secret-{k}"))
                    .unwrap_or_else(|| panic!("{at}: no {who} secret {k}"))
            };
            let (name, namespace) = (get("name"), namespace_of(get("namespace")));
            let secret = objects.iter().find_map(|(_, o)| match o {
                Object::Secret(s)
                    if s.metadata.name.as_ref() == Some(name)
                        && s.metadata.namespace.as_deref() == namespace =>
                {
                    Some(s)
                }
                _ => None,
            });
            let secret = secret.unwrap_or_else(|| panic!("{at}: no Secret {namespace:?}/{name}"));
            let data = secret.string_data.as_ref().unwrap();
            assert!(
                data.contains_key(qcow2_csi::csi::keys::SECRET_KEY),
                "{at}: the Secret has no passphrase"
            );
        }
        let namespace = namespace_of(get_param(
            &params,
            "csi.storage.k8s.io/provisioner-secret-namespace",
        ));
        let granted = objects.iter().any(|(_, o)| match o {
            Object::RoleBinding(b) => {
                b.metadata.namespace.as_deref() == namespace
                    && b.subjects
                        .iter()
                        .flatten()
                        .any(|s| s.kind == "ServiceAccount" && s.name == "qcow2-csi-node")
                    && objects.iter().any(|(_, r)| match r {
                        Object::Role(role) => {
                            role.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                                && role.metadata.namespace.as_deref() == namespace
                                && role.rules.iter().flatten().any(|rule| {
                                    rule.resources.iter().flatten().any(|r| r == "secrets")
                                        && rule.verbs.iter().any(|v| v == "get")
                                })
                        }
                        _ => false,
                    })
            }
            _ => false,
        });
        assert!(
            granted,
            "{at}: the provisioner may not read Secrets in {namespace:?}"
        );
    }
    assert_eq!(encrypted, 1, "one encrypted class in the examples");
}

/// A secret namespace parameter as the namespace of an object of the examples.
fn namespace_of(param: &str) -> Option<&str> {
    (param != "${pvc.namespace}").then_some(param)
}

fn get_param<'a>(params: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    params.get(key).map(String::as_str).unwrap_or_default()
}

/// The examples name classes the chart makes and objects the examples make, so they apply
/// as written.
#[test]
fn the_examples_refer_to_what_exists() {
    let (mut storage, mut snapshot, mut claims, mut snapshots, mut attributes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let objects = all_objects();
    for (_, obj) in &objects {
        match obj {
            Object::StorageClass(c) => storage.push(c.metadata.name.clone().unwrap()),
            Object::VolumeAttributesClass(c) => attributes.push(c.metadata.name.clone().unwrap()),
            Object::VolumeSnapshotClass(c) => snapshot.push(c.metadata.name.clone().unwrap()),
            Object::PersistentVolumeClaim(c) => claims.push(c.metadata.name.clone().unwrap()),
            Object::VolumeSnapshot(s) => snapshots.push(s.metadata.name.clone().unwrap()),
            _ => {}
        }
    }
    let mut sources = 0;
    for (file, obj) in &objects {
        let at = file.display();
        match obj {
            Object::PersistentVolumeClaim(c) => {
                let spec = c.spec.as_ref().unwrap();
                let class = spec.storage_class_name.as_ref().unwrap();
                assert!(storage.contains(class), "{at}: class {class}");
                if let Some(class) = &spec.volume_attributes_class_name {
                    assert!(attributes.contains(class), "{at}: attributes {class}");
                }
                if let Some(src) = &spec.data_source {
                    sources += 1;
                    let names = match src.kind.as_str() {
                        "VolumeSnapshot" => &snapshots,
                        "PersistentVolumeClaim" => &claims,
                        other => panic!("{at}: data source kind {other}"),
                    };
                    assert!(names.contains(&src.name), "{at}: source {}", src.name);
                }
            }
            Object::VolumeSnapshot(s) => {
                let class = s.spec.volume_snapshot_class_name.as_ref().unwrap();
                assert!(snapshot.contains(class), "{at}: class {class}");
                let pvc = s.spec.source.persistent_volume_claim_name.as_ref().unwrap();
                assert!(claims.contains(pvc), "{at}: claim {pvc}");
            }
            Object::Pod(p) => {
                for v in p.spec.as_ref().unwrap().volumes.iter().flatten() {
                    if let Some(c) = &v.persistent_volume_claim {
                        assert!(claims.contains(&c.claim_name), "{at}: {}", c.claim_name);
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(sources, 2, "a restore and a clone");
    let mut classes = 0;
    for (_, obj) in &objects {
        if let Object::VolumeAttributesClass(c) = obj {
            check_attributes_class(c);
            classes += 1;
        }
    }
    assert_eq!(classes, 2, "a claim moved between two attribute classes");
    check_encrypted_classes(&objects);
    // A group snapshot names a class the chart makes once group snapshots are on, and its
    // selector picks two claims of the examples.
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("charts/qcow2-csi/values.yaml")).unwrap(),
    )
    .unwrap();
    let group_classes: Vec<&str> = values["groupSnapshots"]["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let mut groups = 0;
    for (file, obj) in &objects {
        if let Object::VolumeGroupSnapshot(g) = obj {
            groups += 1;
            let class = g.spec.volume_group_snapshot_class_name.as_deref().unwrap();
            assert!(
                group_classes.contains(&class),
                "{}: class {class}",
                file.display()
            );
            let wanted = g
                .spec
                .source
                .selector
                .as_ref()
                .unwrap()
                .match_labels
                .clone()
                .unwrap();
            let picked = objects
                .iter()
                .filter(|(_, o)| match o {
                    Object::PersistentVolumeClaim(c) => {
                        let labels = c.metadata.labels.clone().unwrap_or_default();
                        wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
                    }
                    _ => false,
                })
                .count();
            assert_eq!(picked, 2, "{}: the group's claims", file.display());
        }
    }
    assert_eq!(groups, 1);
}

#[test]
fn plugin_flags_in_the_daemonset_exist_in_serve_help() {
    let help = serve_help();
    let args = plugin_args();
    assert!(args.len() >= 5, "{args:?}");
    assert_eq!(flags_missing_from(&help, &args), Vec::<String>::new());
    // The check itself catches a flag the plugin lacks.
    let mut broken = args.clone();
    broken.push("--max-volume=3".into());
    assert_eq!(flags_missing_from(&help, &broken), ["--max-volume"]);
}

/// The DaemonSet's own arguments (paths moved into a temporary directory, the metrics port
/// to any free one) start a plugin that answers Probe and serves metrics: the values parse,
/// not only the names. Its live scrape passes `promtool check metrics`, and every metric the
/// chart's alerts and dashboard name is one it serves.
#[tokio::test]
async fn the_daemonsets_plugin_arguments_start_a_ready_plugin() {
    let args: Vec<String> = plugin_args()
        .into_iter()
        .filter(|a| {
            ![
                "--endpoint=",
                "--node-id=",
                "--state-dir=",
                "--kubelet-dir=",
            ]
            .iter()
            .any(|p| a.starts_with(p))
        })
        .map(|a| match a.strip_prefix("--metrics-address=:") {
            Some(_) => "--metrics-address=:0".to_string(),
            None => a,
        })
        .collect();
    assert!(
        args.contains(&"--metrics-address=:0".to_string()),
        "{args:?}"
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Plugin::start_with_args(&refs).await;
    let info = p
        .identity()
        .await
        .get_plugin_info(csi_proto::v1::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER_NAME);
    let address = p.metrics_address().await;
    let port = address.rsplit_once(':').unwrap().1.to_string();
    let text = tokio::task::spawn_blocking(move || support::scrape(&format!("127.0.0.1:{port}")))
        .await
        .unwrap();
    support::promtool_check_metrics(&text);
    let served = served_names(&text);
    assert!(
        served.contains("qcow2_csi_volume_io_operations_total"),
        "{served:?}"
    );
    let chart = root().join("charts/qcow2-csi/files");
    for file in ["prometheus-rules.yaml", "grafana-dashboard.json"] {
        let used = std::fs::read_to_string(chart.join(file)).unwrap();
        assert_eq!(
            unknown_metrics(&used, &served),
            Vec::<String>::new(),
            "{file}"
        );
    }
    // The check itself catches a name the plugin does not serve.
    let typo = "rate(qcow2_csi_volume_io_operation_total[5m])";
    assert_eq!(
        unknown_metrics(typo, &served),
        ["qcow2_csi_volume_io_operation_total"]
    );
}

/// The series names a Prometheus text scrape can have: each family's name, and a
/// histogram's `_bucket`, `_sum` and `_count`.
fn served_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The `qcow2_csi_*` names in `text` (a rules file, a dashboard) that `served` lacks.
fn unknown_metrics(text: &str, served: &std::collections::BTreeSet<String>) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("qcow2_csi_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        if !served.contains(&name) && !unknown.contains(&name) {
            unknown.push(name);
        }
    }
    unknown
}

/// The chart's alerts pass `promtool check rules` and their unit tests (each alert fires on
/// the series that should raise it), and promtool rejects a broken rule.
#[test]
fn the_alerts_pass_promtool_and_their_unit_tests() {
    if !support::require_tool("promtool", "prometheus") {
        return;
    }
    let chart = root().join("charts/qcow2-csi");
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(chart.join("files/prometheus-rules.yaml")));
    assert!(ok && out.contains("SUCCESS: 9 rules found"), "{out}");
    let (ok, out) = run(Command::new("promtool").current_dir(&chart).args([
        "test",
        "rules",
        "ci/prometheus-rules-test.yaml",
    ]));
    assert!(ok, "{out}");
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(chart.join("files/prometheus-rules.yaml")).unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, rules.replacen("> 0", "> > 0", 1)).unwrap();
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(&broken));
    assert!(!ok, "{out}");
}

/// The dashboard is JSON Grafana can load: a title and uid, template variables, and panels
/// that each query something.
#[test]
fn the_dashboard_parses_and_every_panel_queries() {
    let text =
        std::fs::read_to_string(root().join("charts/qcow2-csi/files/grafana-dashboard.json"))
            .unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "qcow2-csi");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "volume"]);
    let panels = d["panels"].as_array().unwrap();
    let mut queried = 0;
    for p in panels {
        let kind = p["type"].as_str().unwrap();
        assert!(p["gridPos"]["w"].as_u64().unwrap() <= 24, "{p}");
        if kind == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("qcow2_csi_"), "{expr}");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{expr}"
            );
        }
        queried += 1;
    }
    assert!(queried >= 15, "{queried} panels");
    let ids: std::collections::BTreeSet<u64> =
        panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
}

/// What any rendering of the chart must hold, whatever the values: names, paths and
/// parameters that match the code, the socket where kubelet and the sidecars look for it,
/// and plugin flags that `serve` accepts.
fn check_rendered(objects: Vec<Object>, help: &str) {
    let mut classes = 0;
    let mut daemonsets = Vec::new();
    let mut grants = Vec::new();
    for obj in objects {
        match obj {
            Object::ClusterRole(r) => {
                for rule in r.rules.iter().flatten() {
                    for res in rule.resources.iter().flatten() {
                        for verb in &rule.verbs {
                            grants.push(format!("{verb} {res}"));
                        }
                    }
                }
            }
            Object::CSIDriver(d) => {
                assert_eq!(d.metadata.name.as_deref(), Some(DRIVER_NAME));
                let spec = d.spec;
                assert_eq!(spec.attach_required, Some(false));
                assert_eq!(spec.pod_info_on_mount, Some(true));
                assert_eq!(spec.fs_group_policy.as_deref(), Some("File"));
                assert_eq!(spec.storage_capacity, Some(true));
                assert_eq!(
                    spec.volume_lifecycle_modes.as_deref(),
                    Some(&["Persistent".to_string()][..])
                );
            }
            Object::StorageClass(c) => {
                classes += 1;
                assert_eq!(c.provisioner, DRIVER_NAME);
                assert_eq!(
                    c.volume_binding_mode.as_deref(),
                    Some("WaitForFirstConsumer")
                );
                assert_eq!(c.allow_volume_expansion, Some(true));
                // The class's parameters are ones CreateVolume accepts.
                let params: HashMap<String, String> =
                    c.parameters.unwrap_or_default().into_iter().collect();
                qcow2_csi::csi::params::Params::parse(&params)
                    .unwrap_or_else(|e| panic!("StorageClass parameters {params:?}: {e}"));
            }
            Object::VolumeSnapshotClass(c) => {
                assert_eq!(c.driver, DRIVER_NAME);
                assert!(c.parameters.is_empty(), "{:?}", c.metadata.name);
            }
            Object::VolumeAttributesClass(c) => check_attributes_class(&c),
            Object::VolumeGroupSnapshotClass(c) => {
                assert_eq!(c.driver, DRIVER_NAME);
                assert!(c.parameters.is_empty(), "{:?}", c.metadata.name);
            }
            Object::DaemonSet(d) => daemonsets.push(*d),
            _ => {}
        }
    }
    assert!(classes >= 1);
    let [ds] = &daemonsets[..] else {
        panic!("{} DaemonSets", daemonsets.len())
    };
    let plugin = container(ds, "qcow2-csi");
    let args = plugin.args.clone().unwrap();
    assert_eq!(args[0], "serve", "{args:?}");
    assert_eq!(flags_missing_from(help, &args[1..]), Vec::<String>::new());
    // What the plugin reads with --watch-volume-attributes is granted.
    if args.contains(&"--watch-volume-attributes".to_string()) {
        for needed in [
            "list persistentvolumes",
            "watch persistentvolumes",
            "get volumeattributesclasses",
        ] {
            assert!(grants.iter().any(|g| g == needed), "{needed}: {grants:?}");
        }
    }
    assert!(args.contains(&"--endpoint=unix:///csi/csi.sock".to_string()));
    // kubelet reaches the socket through the registrar's path, on the host directory that
    // is mounted at /csi, where the plugin listens.
    let registrar = container(ds, "node-driver-registrar");
    let reg_path = registrar
        .args
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|a| a.strip_prefix("--kubelet-registration-path="))
        .expect("registration path")
        .to_string();
    assert!(
        reg_path.ends_with(&format!("/plugins/{DRIVER_NAME}/csi.sock")),
        "{reg_path}"
    );
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let host_path = |name: &str| {
        pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
            .unwrap_or_else(|| panic!("no hostPath volume {name}"))
    };
    assert_eq!(format!("{}/csi.sock", host_path("socket-dir")), reg_path);
    for c in &pod.containers {
        let mounts = c.volume_mounts.as_deref().unwrap_or_default();
        assert!(
            mounts
                .iter()
                .any(|m| m.name == "socket-dir" && m.mount_path == "/csi"),
            "{} does not see the socket",
            c.name
        );
    }
    // Staging and publish mounts must propagate to the host, under kubelet's directory.
    let kubelet = plugin
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "kubelet-dir")
        .unwrap();
    assert_eq!(kubelet.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(kubelet.mount_path, host_path("kubelet-dir"));
    assert!(reg_path.starts_with(&format!("{}/plugins/", kubelet.mount_path)));
    assert_eq!(
        plugin.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    // The state directory the plugin is told about is the one mounted from the host.
    let state_dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .unwrap();
    assert_eq!(state_dir, host_path("state-dir"));
    // kubelet's liveness check goes where livenessprobe listens.
    let port = plugin.ports.as_ref().unwrap()[0].container_port;
    let probe = container(ds, "liveness-probe");
    assert!(
        probe
            .args
            .as_ref()
            .unwrap()
            .contains(&format!("--http-endpoint=:{port}")),
        "{:?}",
        probe.args
    );
}

/// A VolumeAttributesClass is this driver's, and ModifyVolume accepts its parameters.
fn check_attributes_class(c: &VolumeAttributesClass) {
    assert_eq!(c.driver_name, DRIVER_NAME, "{:?}", c.metadata.name);
    let params: HashMap<String, String> = c
        .parameters
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    qcow2_csi::nbd::qos::Limits::default()
        .modified(&params)
        .unwrap_or_else(|e| panic!("VolumeAttributesClass parameters {params:?}: {e}"));
}

#[test]
fn names_paths_and_parameters_match_the_code() {
    check_rendered(chart_objects(), &serve_help());

    // The examples place restores and clones with the driver's topology key.
    let mut keys = 0;
    for (_, obj) in all_objects() {
        if let Object::Pod(p) = obj
            && let Some(aff) = p.spec.unwrap().affinity.and_then(|a| a.pod_affinity)
        {
            for term in aff
                .required_during_scheduling_ignored_during_execution
                .unwrap_or_default()
            {
                assert_eq!(term.topology_key, TOPOLOGY_KEY);
                keys += 1;
            }
        }
    }
    assert!(
        keys >= 2,
        "restore and clone examples pin to the source's node"
    );

    // The e2e suite's driver description.
    let text = std::fs::read_to_string(root().join("tests/e2e/test-driver.yaml")).unwrap();
    let e2e = &documents(&text).unwrap()[0];
    assert_eq!(e2e["DriverInfo"]["Name"], DRIVER_NAME);
    assert_eq!(
        e2e["DriverInfo"]["TopologyKeys"],
        serde_json::json!([TOPOLOGY_KEY])
    );
    // It says what the plugin offers: node-only expansion.
    assert_eq!(
        e2e["DriverInfo"]["Capabilities"]["controllerExpansion"],
        false
    );
    assert_eq!(e2e["DriverInfo"]["Capabilities"]["nodeExpansion"], true);
}

/// The tools venv made by `hack/test-deps.sh` (kubernetes-validate, helm-python-sdk,
/// hadolint); `None` (the test skips) when absent, a failure in CI.
fn tools() -> Option<PathBuf> {
    let bin = root().join(".venv-tools/bin");
    let missing = (!bin.join("kubernetes-validate").exists())
        .then(|| "the tools venv is missing: run hack/test-deps.sh".to_string());
    support::runnable("the deploy tool checks", missing).then_some(bin)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn deploy_is_the_chart_rendered_with_its_defaults() {
    let Some(bin) = tools() else { return };
    let (ok, rendered) = run(Command::new(bin.join("python"))
        .arg(root().join("hack/deploy.py"))
        .args(["render", "--stdout"]));
    assert!(ok, "{rendered}");
    let committed = std::fs::read_to_string(root().join("deploy/qcow2-csi.yaml")).unwrap();
    assert!(
        rendered == committed,
        "deploy/qcow2-csi.yaml differs from the chart's rendering: run `make deploy`"
    );
}

/// `charts/qcow2-csi/ci/all-options-values.yaml` switches every optional branch of the
/// templates on; its rendering is held to the same checks as `deploy/`.
#[test]
fn every_option_of_the_chart_renders_valid_objects() {
    let Some(bin) = tools() else { return };
    let values = root().join("charts/qcow2-csi/ci/all-options-values.yaml");
    let (ok, rendered) = run(Command::new(bin.join("python"))
        .arg(root().join("hack/deploy.py"))
        .args(["render", "--values"])
        .arg(&values));
    assert!(ok, "{rendered}");
    let objects = objects_of(&rendered, "all-options rendering");
    // The options took effect.
    let mut defaults = Vec::new();
    for o in &objects {
        match o {
            Object::StorageClass(c) if c.metadata.annotations.is_some() => {
                defaults.push(c.metadata.name.clone().unwrap());
            }
            Object::VolumeSnapshotClass(c) if c.metadata.annotations.is_some() => {
                defaults.push(c.metadata.name.clone().unwrap());
            }
            Object::DaemonSet(d) => {
                let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
                assert!(pod.init_containers.is_none(), "loadNbdModule: false");
                assert!(pod.affinity.is_some() && pod.image_pull_secrets.is_some());
                assert_eq!(pod.priority_class_name, None);
                let plugin = container(d, "qcow2-csi");
                assert_eq!(
                    plugin.image.as_deref(),
                    Some("registry.example.com/storage/qcow2-csi:0.1.0-rc1")
                );
                assert!(
                    plugin
                        .args
                        .as_ref()
                        .unwrap()
                        .contains(&"--attach=nbdfuse".to_string())
                );
            }
            _ => {}
        }
    }
    assert_eq!(defaults, ["qcow2", "qcow2"], "the default classes");
    // Group snapshots on: the class, the snapshotter's gate and group RBAC, the labeller.
    let mut group_classes = 0;
    let mut grants = Vec::new();
    for o in &objects {
        match o {
            Object::VolumeGroupSnapshotClass(c) => {
                group_classes += 1;
                assert!(c.metadata.annotations.is_some(), "the default group class");
            }
            Object::ClusterRole(r) => {
                for rule in r.rules.iter().flatten() {
                    for res in rule.resources.iter().flatten() {
                        for verb in &rule.verbs {
                            grants.push(format!("{verb} {res}"));
                        }
                    }
                }
            }
            Object::DaemonSet(d) => {
                let gate = "--feature-gates=CSIVolumeGroupSnapshot=true".to_string();
                assert!(
                    container(d, "csi-snapshotter")
                        .args
                        .as_ref()
                        .unwrap()
                        .contains(&gate)
                );
                let label = "--label-snapshot-contents".to_string();
                assert!(
                    container(d, "qcow2-csi")
                        .args
                        .as_ref()
                        .unwrap()
                        .contains(&label)
                );
            }
            _ => {}
        }
    }
    assert_eq!(group_classes, 1);
    for needed in [
        "patch volumegroupsnapshotcontents",
        "watch volumegroupsnapshotcontents",
        "patch volumesnapshotcontents",
        "update volumegroupsnapshotcontents/status",
        "list volumegroupsnapshotclasses",
    ] {
        assert!(grants.iter().any(|g| g == needed), "{needed}: {grants:?}");
    }
    check_metrics_objects(&objects, 9900);
    check_rendered(objects, &serve_help());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all-options.yaml");
    std::fs::write(&file, &rendered).unwrap();
    // The VolumeAttributesClasses need 1.34 (storage.k8s.io/v1).
    let (ok, out) = run(Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "-k", "1.34.0"])
        .arg(&file));
    assert!(ok, "{out}");
}

/// The metrics objects of a rendering with all of them on: the plugin listens on `port`,
/// the Service reaches the plugin's pods on it, the ServiceMonitor selects that Service and
/// scrapes its port, the PrometheusRule carries the rules file and the ConfigMap the
/// dashboard, as they are.
fn check_metrics_objects(objects: &[Object], port: i32) {
    let ds = objects
        .iter()
        .find_map(|o| match o {
            Object::DaemonSet(d) => Some(d),
            _ => None,
        })
        .unwrap();
    let plugin = container(ds, "qcow2-csi");
    assert!(
        plugin
            .args
            .as_ref()
            .unwrap()
            .contains(&format!("--metrics-address=:{port}"))
    );
    let named = plugin
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a metrics port");
    assert_eq!(named.container_port, port);
    let pod_labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let mut services = objects.iter().filter_map(|o| match o {
        Object::Service(s) => Some(s),
        _ => None,
    });
    let svc = services.next().expect("a metrics Service");
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
    for (k, v) in spec.selector.as_ref().unwrap() {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "the Service selects the plugin pods"
        );
    }
    let svc_port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(svc_port.port, port);
    assert_eq!(
        svc_port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into()))
    );
    let monitor = objects
        .iter()
        .find_map(|o| match o {
            Object::ServiceMonitor(m) => Some(m),
            _ => None,
        })
        .expect("a ServiceMonitor");
    let svc_labels = svc.metadata.labels.clone().unwrap();
    for (k, v) in monitor.spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(
            svc_labels.get(k),
            Some(v),
            "the ServiceMonitor selects the Service"
        );
    }
    assert_eq!(
        monitor.spec.endpoints[0].port.as_deref(),
        svc_port.name.as_deref()
    );
    let rule = objects
        .iter()
        .find_map(|o| match o {
            Object::PrometheusRule(r) => Some(r),
            _ => None,
        })
        .expect("a PrometheusRule");
    let file: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("charts/qcow2-csi/files/prometheus-rules.yaml"))
            .unwrap(),
    )
    .unwrap();
    let file_rules = file["groups"][0]["rules"].as_array().unwrap();
    let rules = &rule.spec.groups[0].rules;
    assert_eq!(rules.len(), file_rules.len());
    for (r, f) in rules.iter().zip(file_rules) {
        assert_eq!(r.alert.as_deref(), f["alert"].as_str());
        assert_eq!(r.expr, f["expr"].as_str().unwrap());
        assert_eq!(
            r.annotations.as_ref().unwrap()["summary"],
            f["annotations"]["summary"].as_str().unwrap()
        );
    }
    let dashboard = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) => Some(c),
            _ => None,
        })
        .expect("a dashboard ConfigMap");
    let json = &dashboard.data.as_ref().unwrap()["qcow2-csi.json"];
    let file =
        std::fs::read_to_string(root().join("charts/qcow2-csi/files/grafana-dashboard.json"))
            .unwrap();
    assert_eq!(json.trim_end(), file.trim_end());
}

#[test]
fn kubernetes_validate_strict_accepts_the_manifests_and_rejects_a_typo() {
    let Some(bin) = tools() else { return };
    for version in ["1.30.0", "1.34.0"] {
        // VolumeAttributesClass is storage.k8s.io/v1 from Kubernetes 1.34 on.
        let files = manifest_files().into_iter().filter(|f| {
            version != "1.30.0"
                || !std::fs::read_to_string(f)
                    .unwrap()
                    .contains("kind: VolumeAttributesClass")
        });
        let (ok, out) = run(Command::new(bin.join("kubernetes-validate"))
            .args(["--strict", "-k", version])
            .args(files));
        assert!(ok, "kubernetes {version}: {out}");
        assert!(out.contains("passed for resource daemonset/"), "{out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("deploy/qcow2-csi.yaml")).unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        text.replacen("  attachRequired: false", "  attachRequird: false", 1),
    )
    .unwrap();
    let (ok, out) = run(Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "-k", "1.34.0"])
        .arg(&broken));
    assert!(!ok && out.contains("attachRequird"), "{out}");
}

#[test]
fn the_chart_lints_and_its_schema_refuses_bad_values() {
    let Some(bin) = tools() else { return };
    let deploy_py = |args: &[&str]| {
        run(Command::new(bin.join("python"))
            .arg(root().join("hack/deploy.py"))
            .args(args))
    };
    let (ok, out) = deploy_py(&["lint"]);
    assert!(ok, "{out}");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let good = write(
        "good.yaml",
        "node:\n  maxVolumes: 8\n  attach: nbdfuse\nkubeletDir: /var/lib/k0s/kubelet\n",
    );
    let (ok, out) = deploy_py(&["values", &good]);
    assert!(ok, "{out}");
    for (name, text, says) in [
        ("typo.yaml", "node:\n  stateDri: /x\n", "stateDri"),
        ("enum.yaml", "node:\n  attach: kernel\n", "attach"),
        (
            "param.yaml",
            "storageClasses:\n  - name: fast\n    default: false\n    reclaimPolicy: Delete\n    \
             fsType: ext4\n    parameters:\n      clustersize: \"64K\"\n    mountOptions: []\n",
            "clustersize",
        ),
        ("path.yaml", "kubeletDir: var/lib/kubelet\n", "kubeletDir"),
    ] {
        let f = write(name, text);
        let (ok, out) = deploy_py(&["values", &f]);
        assert!(!ok && out.contains(says), "{name}: {out}");
    }
    // A broken template fails the lint.
    let chart = dir.path().join("qcow2-csi");
    copy_dir(&root().join("charts/qcow2-csi"), &chart);
    let node = chart.join("templates/node.yaml");
    let text = std::fs::read_to_string(&node).unwrap();
    std::fs::write(
        &node,
        text.replacen(
            "{{ .Values.node.stateDir }}",
            "{{ .Values.node.missing.stateDir }}",
            1,
        ),
    )
    .unwrap();
    let (ok, out) = deploy_py(&["lint", chart.to_str().unwrap()]);
    assert!(!ok && out.contains("nil pointer"), "{out}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn hadolint_accepts_the_dockerfile_and_flags_a_careless_one() {
    let Some(bin) = tools() else { return };
    let (ok, out) = run(Command::new(bin.join("hadolint"))
        .arg("--config")
        .arg(root().join(".hadolint.yaml"))
        .arg(root().join("Dockerfile")));
    assert!(ok, "{out}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(
        &bad,
        "FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y kmod\n",
    )
    .unwrap();
    let (ok, out) = run(Command::new(bin.join("hadolint"))
        .arg("--config")
        .arg(root().join(".hadolint.yaml"))
        .arg(&bad));
    assert!(!ok && out.contains("DL3015"), "{out}");
}

/// The kind workflow scripts cannot run in CI (no Docker engine): shellcheck is what checks
/// them there, with the Makefile's and CI's scripts.
#[test]
fn shellcheck_accepts_the_scripts_and_flags_a_careless_one() {
    let Some(bin) = tools() else { return };
    let mut scripts = vec![root().join(".ci/run")];
    for dir in ["hack", "tests/e2e"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sh") {
                scripts.push(p);
            }
        }
    }
    assert!(scripts.len() >= 10, "{scripts:?}");
    let (ok, out) = run(Command::new(bin.join("shellcheck"))
        .current_dir(root())
        .args(&scripts));
    assert!(ok, "{out}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.sh");
    std::fs::write(&bad, "#!/usr/bin/env bash\ndir=$1\nrm -rf $dir/staging\n").unwrap();
    let (ok, out) = run(Command::new(bin.join("shellcheck")).arg(&bad));
    assert!(!ok && out.contains("SC2086"), "{out}");
}
