//! `--watch-volume-attributes`: the node applies its volumes' VolumeAttributesClass from the
//! Kubernetes API.
//!
//! The csi-resizer sends ControllerModifyVolume to the plugin of the node that leads its
//! election, which is rarely the node that holds the volume. That plugin validates the class
//! and accepts it ([`super::modify::controller_modify`]); the resizer then sets the
//! PersistentVolume's `volumeAttributesClassName`. Every node watches PersistentVolumes, and
//! when one of its own volumes names a class it reads the class's parameters and applies
//! them to the volume's record and live export ([`super::modify::apply`]). The watch is
//! level-triggered: a node that was down applies the class when it comes back, from the
//! watch's first listing.
//!
//! What it reads: PersistentVolumes (list, watch) and VolumeAttributesClasses (get), with
//! the pod's service account. It writes nothing to the API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::VolumeAttributesClass;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_stream::StreamExt;

use qcow2_engine::sync::Recover;

use super::Plugin;
use super::modify::{Applied, apply};
use crate::error::Error;

/// How often a class that could not be applied yet (the volume busy, the API unreachable)
/// is tried again, and how many times.
const RETRY_EVERY: Duration = Duration::from_secs(1);
const RETRIES: u32 = 120;

/// The volume id and class a PersistentVolume of `driver` asks for, if it names a class.
pub fn wanted(pv: &PersistentVolume, driver: &str) -> Option<(String, String)> {
    let spec = pv.spec.as_ref()?;
    let csi = spec.csi.as_ref().filter(|c| c.driver == driver)?;
    let class = spec.volume_attributes_class_name.clone()?;
    Some((csi.volume_handle.clone(), class))
}

/// A client of the Kubernetes API (in-cluster, else the kubeconfig), for the feature `flag`
/// turns on: tried every 10 s until one is made, each failure logged.
pub(super) async fn api_client(flag: &str) -> Client {
    loop {
        match Client::try_default().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::error!(error = %e, "no Kubernetes API client for {flag}; trying again in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// The objects a watch of `api` sees applied (created, changed, or listed again at a
/// resync), for ever: an error is logged (naming `what`) and skipped, and the watch goes on
/// with a backoff.
pub(super) fn applied<K>(api: Api<K>, what: &'static str) -> impl tokio_stream::Stream<Item = K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .filter_map(move |event| match event {
            Ok(object) => Some(object),
            Err(e) => {
                tracing::warn!(error = %e, "watching {what}");
                None
            }
        })
}

/// Watches PersistentVolumes until the process exits, from when the state directory has
/// loaded; errors are logged and the watch is restarted with a backoff.
pub async fn watch(plugin: Arc<Plugin>) {
    if !plugin.loaded().await {
        tracing::error!("not watching PersistentVolumes: the state directory failed to load");
        return;
    }
    let client = api_client("--watch-volume-attributes").await;
    tracing::info!("watching PersistentVolumes for VolumeAttributesClass changes");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let classes: Api<VolumeAttributesClass> = Api::all(client);
    // The class each volume's PersistentVolume names last: a task still retrying an older
    // class gives up once a newer one is named.
    let latest: Latest = Arc::default();
    let mut events = std::pin::pin!(applied(pvs, "PersistentVolumes"));
    while let Some(pv) = events.next().await {
        let Some((id, class)) = wanted(&pv, &plugin.config.driver_name) else {
            continue;
        };
        let has = plugin
            .state()
            .map(|st| st.volume(&id).is_some())
            .unwrap_or(false);
        if !has {
            continue;
        }
        let named_before = latest.lock().recover().insert(id.clone(), class.clone());
        // Named already: applied, or a task is at it. Resyncs and status updates end here.
        if named_before.as_ref() != Some(&class) {
            tokio::spawn(reconcile(
                plugin.clone(),
                classes.clone(),
                latest.clone(),
                id,
                class,
            ));
        }
    }
}

type Latest = Arc<Mutex<HashMap<String, String>>>;

/// Applies class `class` to volume `id` of this node, trying again while the volume is busy
/// or the class cannot be read, until a newer class is named.
async fn reconcile(
    plugin: Arc<Plugin>,
    classes: Api<VolumeAttributesClass>,
    latest: Latest,
    id: String,
    class: String,
) {
    let still_wanted = || latest.lock().recover().get(&id) == Some(&class);
    for attempt in 0..=RETRIES {
        if attempt > 0 {
            tokio::time::sleep(RETRY_EVERY).await;
        }
        if !still_wanted() {
            return;
        }
        let parameters = match classes.get(&class).await {
            Ok(vac) if vac.driver_name != plugin.config.driver_name => {
                tracing::warn!(volume = %id, class = %class, driver = %vac.driver_name, "refused: the VolumeAttributesClass is another driver's");
                return;
            }
            Ok(vac) => vac.parameters.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(volume = %id, class = %class, error = %e, "reading the VolumeAttributesClass");
                continue;
            }
        };
        match apply_blocking(&plugin, &id, parameters).await {
            Ok(Applied::Changed { limits, live }) => {
                tracing::info!(volume = %id, class = %class, ?limits, live, "VolumeAttributesClass applied");
                return;
            }
            Ok(Applied::Unchanged | Applied::NotHere) => return,
            Err(Error::Aborted(_) | Error::Unavailable(_)) => continue,
            Err(e) => {
                tracing::warn!(volume = %id, class = %class, error = %e, "refused the VolumeAttributesClass");
                return;
            }
        }
    }
    tracing::error!(volume = %id, class = %class, "gave up applying the VolumeAttributesClass; the next class named tries again, or a restart");
    // Forgotten, so the next event of the PersistentVolume tries again.
    let mut map = latest.lock().recover();
    if map.get(&id) == Some(&class) {
        map.remove(&id);
    }
}

async fn apply_blocking(
    plugin: &Arc<Plugin>,
    id: &str,
    parameters: std::collections::BTreeMap<String, String>,
) -> crate::error::Result<Applied> {
    let raw: HashMap<String, String> = parameters.into_iter().collect();
    let id = id.to_string();
    let p = plugin.clone();
    plugin.blocking(move || apply(&p, &id, &raw)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{CSIPersistentVolumeSource, PersistentVolumeSpec};

    fn pv(driver: &str, class: Option<&str>) -> PersistentVolume {
        PersistentVolume {
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: driver.into(),
                    volume_handle: "vol-1".into(),
                    ..Default::default()
                }),
                volume_attributes_class_name: class.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_this_drivers_volumes_with_a_class_are_wanted() {
        assert_eq!(
            wanted(&pv("qcow2.csi.dev", Some("fast")), "qcow2.csi.dev"),
            Some(("vol-1".into(), "fast".into()))
        );
        assert_eq!(wanted(&pv("qcow2.csi.dev", None), "qcow2.csi.dev"), None);
        assert_eq!(
            wanted(&pv("other.csi", Some("fast")), "qcow2.csi.dev"),
            None
        );
        assert_eq!(wanted(&PersistentVolume::default(), "qcow2.csi.dev"), None);
    }
}
