//! A small CSI client for trying `qcow2-csi serve` by hand (grpcurl works too, with
//! `-authority localhost`; see README).
//!
//! ```sh
//! cargo run -p qcow2-csi --example csi_client -- unix:///tmp/qcow2-csi/csi.sock info
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT create NAME SIZE_BYTES
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT list
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT stage VOLUME_ID STAGING_DIR
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT unstage VOLUME_ID STAGING_DIR
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT delete VOLUME_ID
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT snapshot VOLUME_ID NAME
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT restore NAME SNAPSHOT_ID
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT snapshots
//! cargo run -p qcow2-csi --example csi_client -- ENDPOINT delete-snapshot SNAPSHOT_ID
//! ```

use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::identity_client::IdentityClient;
use csi_proto::v1::node_client::NodeClient;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use csi_proto::v1::*;

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (endpoint, cmd) = match args.as_slice() {
        [e, c, ..] => (e.as_str(), c.as_str()),
        _ => anyhow::bail!(
            "usage: csi_client ENDPOINT info|create|list|stage|unstage|delete|snapshot|restore|snapshots|delete-snapshot ..."
        ),
    };
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i + 2)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("{cmd}: missing argument {}", i + 1))
    };
    let socket = qcow2_csi::csi::serve::socket_path(endpoint)?;
    let ch = qcow2_csi::csi::client::connect(&socket).await?;
    match cmd {
        "info" => {
            let mut id = IdentityClient::new(ch.clone());
            println!(
                "{:?}",
                id.get_plugin_info(GetPluginInfoRequest {})
                    .await?
                    .into_inner()
            );
            println!("{:?}", id.probe(ProbeRequest {}).await?.into_inner());
            let mut node = NodeClient::new(ch);
            println!(
                "{:?}",
                node.node_get_info(NodeGetInfoRequest {})
                    .await?
                    .into_inner()
            );
        }
        "create" => {
            let size: i64 = arg(1)?.parse()?;
            let v = ControllerClient::new(ch)
                .create_volume(CreateVolumeRequest {
                    name: arg(0)?.into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_cap()],
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("{:?}", v.volume);
        }
        "list" => {
            let l = ControllerClient::new(ch)
                .list_volumes(ListVolumesRequest::default())
                .await?
                .into_inner();
            for e in l.entries {
                let v = e.volume.unwrap_or_default();
                println!("{} {} bytes", v.volume_id, v.capacity_bytes);
            }
        }
        "stage" | "unstage" => {
            let mut node = NodeClient::new(ch);
            let (id, staging) = (arg(0)?.to_string(), arg(1)?.to_string());
            if cmd == "stage" {
                node.node_stage_volume(NodeStageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                    volume_capability: Some(mount_cap()),
                    ..Default::default()
                })
                .await?;
            } else {
                node.node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging,
                })
                .await?;
            }
            println!("{cmd}d");
        }
        "delete" => {
            ControllerClient::new(ch)
                .delete_volume(DeleteVolumeRequest {
                    volume_id: arg(0)?.into(),
                    ..Default::default()
                })
                .await?;
            println!("deleted");
        }
        "snapshot" => {
            let s = ControllerClient::new(ch)
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: arg(0)?.into(),
                    name: arg(1)?.into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            println!(
                "{} of {} ({} bytes)",
                s.snapshot_id, s.source_volume_id, s.size_bytes
            );
        }
        "restore" => {
            let v = ControllerClient::new(ch)
                .create_volume(CreateVolumeRequest {
                    name: arg(0)?.into(),
                    volume_capabilities: vec![mount_cap()],
                    volume_content_source: Some(VolumeContentSource {
                        r#type: Some(volume_content_source::Type::Snapshot(
                            volume_content_source::SnapshotSource {
                                snapshot_id: arg(1)?.into(),
                            },
                        )),
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .unwrap_or_default();
            println!("{} {} bytes", v.volume_id, v.capacity_bytes);
        }
        "snapshots" => {
            let l = ControllerClient::new(ch)
                .list_snapshots(ListSnapshotsRequest::default())
                .await?
                .into_inner();
            for e in l.entries {
                let s = e.snapshot.unwrap_or_default();
                println!("{} of {}", s.snapshot_id, s.source_volume_id);
            }
        }
        "delete-snapshot" => {
            ControllerClient::new(ch)
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: arg(0)?.into(),
                    ..Default::default()
                })
                .await?;
            println!("deleted");
        }
        other => anyhow::bail!("unknown command {other:?}"),
    }
    Ok(())
}
