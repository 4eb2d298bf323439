//! `qcow2-csi serve`: the gRPC server on a unix socket.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use csi_proto::v1::controller_server::ControllerServer;
use csi_proto::v1::group_controller_server::GroupControllerServer;
use csi_proto::v1::identity_server::IdentityServer;
use csi_proto::v1::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use super::Plugin;
use super::controller::ControllerService;
use super::group::GroupControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use crate::error::{Error, Result};

/// The socket path of a CSI endpoint: `unix:///path`, `unix:/path` or `/path`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "endpoint {endpoint:?} is not unix:///ABSOLUTE/PATH"
        )));
    }
    // sun_path holds 108 bytes with its terminating NUL.
    if path.len() > 107 {
        return Err(Error::InvalidArgument(format!(
            "socket path {path:?} is longer than 107 bytes"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket: creates the parent directory, replaces a stale socket (never another
/// kind of file), and leaves the socket readable and writable by owner and group only.
fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    Ok(listener)
}

/// Removes a socket a previous process left at `path` (never another kind of file), so
/// that it can be bound again.
pub(super) fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing the stale socket {}", path.display()), e)),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "{} exists and is not a socket",
            path.display()
        ))),
        Err(_) => Ok(()),
    }
}

/// The identity of the file at `path`, if any.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// How long shutdown waits for running operations before exiting anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Serves Identity, Controller and Node on `endpoint` until `shutdown` completes or a new
/// process takes the volumes over ([`super::handoff`]); then stops accepting, waits for
/// running operations to finish (idle client connections do not hold it up), and removes
/// the socket if it is still ours. The state directory loads in the background (Probe says
/// not ready until it has). After a shutdown signal, kernel nbd devices are served on for
/// up to [`super::Config::handoff_wait`] while a successor may come for them.
pub async fn serve(
    plugin: Arc<Plugin>,
    endpoint: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let path = socket_path(endpoint)?;
    let listener = bind(&path)?;
    let ours = file_id(&path);
    tracing::info!(
        endpoint = %path.display(),
        node = %plugin.config.node_id,
        state_dir = %plugin.config.state_dir.display(),
        "serving"
    );
    let loader = {
        let plugin = plugin.clone();
        tokio::spawn(async move {
            let p = plugin.clone();
            match plugin.blocking_unchecked(move || p.load()).await {
                Ok(l) => {
                    tracing::info!(
                        volumes = plugin.state().map(|s| s.volumes().count()).unwrap_or(0),
                        partial_files = l.cleanup.partial_files,
                        orphan_layers = l.cleanup.orphan_layers,
                        reattached = l.recovered.reattached,
                        taken_over = l.recovered.adopted.len(),
                        thawed = l.recovered.thawed,
                        lost = l.recovered.lost,
                        forgotten = l.recovered.forgotten,
                        previous_boot = l.recovered.previous_boot,
                        "state directory loaded"
                    );
                    // From now on a successor can take the volumes over.
                    if let Err(e) = super::handoff::listen(plugin.clone()) {
                        tracing::error!(error = %e, "planned restarts will pause I/O: no handover socket");
                    }
                    super::staged::start_healer(plugin.clone());
                }
                Err(e) => tracing::error!(error = %e, "the state directory failed to load"),
            }
            // Chains a previous run left deep (a flatten it did not finish).
            let p = plugin.clone();
            let _ = plugin
                .blocking(move || {
                    let ids: Vec<String> = p
                        .state()
                        .map(|st| st.volumes().map(|v| v.id.clone()).collect())
                        .unwrap_or_default();
                    for id in ids {
                        super::flatten::check(&p, &id);
                    }
                    Ok(())
                })
                .await;
        })
    };
    let signalled = Arc::new(tokio::sync::Notify::new());
    {
        let signalled = signalled.clone();
        tokio::spawn(async move {
            shutdown.await;
            signalled.notify_one();
        });
    }
    let stopping = Arc::new(tokio::sync::Notify::new());
    let stop_serving = {
        let (stopping, signalled, plugin) = (stopping.clone(), signalled.clone(), plugin.clone());
        async move {
            tokio::select! {
                () = signalled.notified() => signalled.notify_one(), // kept for below
                () = plugin.handoff.wait() => {}
            }
            stopping.notify_waiters();
        }
    };
    let server = tonic::transport::Server::builder()
        .layer(super::rpclog::RpcLogLayer::new(plugin.metrics.clone()))
        .add_service(IdentityServer::new(IdentityService(plugin.clone())))
        .add_service(ControllerServer::new(ControllerService(plugin.clone())))
        .add_service(GroupControllerServer::new(GroupControllerService(
            plugin.clone(),
        )))
        .add_service(NodeServer::new(NodeService(plugin.clone())))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop_serving);
    let notified = stopping.notified();
    let drained = {
        let plugin = plugin.clone();
        async move {
            notified.await;
            let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
            while plugin.operations() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if plugin.operations() > 0 {
                tracing::warn!(
                    operations = plugin.operations(),
                    "exiting with operations running"
                );
            }
        }
    };
    // The server future ends when every connection has closed; clients that keep idle
    // connections open would hold it forever, so it is enough that operations drained.
    let result = tokio::select! {
        r = server => r,
        () = drained => Ok(()),
    };
    let _ = loader.await;
    // The socket is the successor's once it bound its own at the same path.
    if file_id(&path) == ours {
        let _ = std::fs::remove_file(&path);
    }
    if plugin.handoff.is_done() {
        tracing::info!("a new plugin process serves the volumes; exiting at the next signal");
        signalled.notified().await;
    } else {
        plugin.node.flush_all();
        let wait = plugin.config.handoff_wait;
        if plugin.node.handable() > 0 && !wait.is_zero() {
            tracing::info!(
                volumes = plugin.node.handable(),
                seconds = wait.as_secs(),
                "serving kernel nbd devices while a new plugin process may take them over"
            );
            if tokio::time::timeout(wait, plugin.handoff.wait())
                .await
                .is_err()
            {
                tracing::warn!("no new plugin process came: the devices wait for the next one");
            }
        }
        plugin.node.leave_attached();
    }
    result.map_err(|e| Error::Internal(format!("gRPC server: {e}")))?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_absolute_socket_paths() {
        for ok in [
            "unix:///csi/csi.sock",
            "unix:/csi/csi.sock",
            "/csi/csi.sock",
        ] {
            assert_eq!(socket_path(ok).unwrap(), Path::new("/csi/csi.sock"));
        }
        for bad in ["unix://csi.sock", "tcp://1.2.3.4:5", "csi.sock"] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
        let long = format!("unix:///{}", "x".repeat(120));
        assert!(socket_path(&long).unwrap_err().to_string().contains("107"));
    }
}
