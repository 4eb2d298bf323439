//! Identity and Controller conformance over the unix socket, following the contract that
//! csi-sanity checks (`docs/csi.md`), plus restarts at crash points.

#[allow(dead_code)]
#[path = "support/csi.rs"]
mod csi;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::collections::HashMap;

use csi::{NODE, Plugin, block_cap, code, mount_cap};
use csi_proto::v1::controller_service_capability::rpc::Type as Rpc;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn create_req(name: &str, size: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: size,
            limit_bytes: size,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter, "")],
        ..CreateVolumeRequest::default()
    }
}

async fn create(p: &Plugin, name: &str, size: i64) -> Volume {
    p.controller()
        .await
        .create_volume(create_req(name, size))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

#[tokio::test]
async fn identity_names_the_driver_and_its_capabilities() {
    let p = Plugin::start().await;
    let mut id = p.identity().await;
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "qcow2.csi.dev");
    // csi-sanity: at most 63 characters, starts and ends with a letter.
    assert!(info.name.len() <= 63);
    assert!(info.name.starts_with(|c: char| c.is_ascii_alphabetic()));
    assert!(info.name.ends_with(|c: char| c.is_ascii_alphabetic()));
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use plugin_capability::Type;
    let mut services = Vec::new();
    let mut online = false;
    for c in caps {
        match c.r#type.unwrap() {
            Type::Service(s) => services.push(s.r#type()),
            Type::VolumeExpansion(e) => {
                online |= e.r#type() == plugin_capability::volume_expansion::Type::Online;
            }
        }
    }
    use plugin_capability::service::Type as S;
    assert_eq!(
        services,
        [
            S::ControllerService,
            S::VolumeAccessibilityConstraints,
            S::GroupControllerService
        ]
    );
    assert!(online);
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn controller_capabilities_are_what_is_implemented() {
    let p = Plugin::start().await;
    let caps: Vec<Rpc> = p
        .controller()
        .await
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type.unwrap() {
            controller_service_capability::Type::Rpc(r) => r.r#type(),
        })
        .collect();
    assert_eq!(
        caps,
        [
            Rpc::CreateDeleteVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::GetVolume,
            Rpc::SingleNodeMultiWriter,
            Rpc::CreateDeleteSnapshot,
            Rpc::ListSnapshots,
            Rpc::CloneVolume,
            Rpc::GetSnapshot,
            Rpc::ModifyVolume,
        ]
    );
}

#[tokio::test]
async fn create_volume_makes_a_qcow2_head_with_the_asked_size_and_parameters() {
    if !qemu::require() {
        return;
    }
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let mut req = create_req("pvc-1", 64 * MIB);
    req.parameters = HashMap::from([
        ("clusterSize".into(), "128K".into()),
        ("subclusters".into(), "true".into()),
        ("csi.storage.k8s.io/pvc/name".into(), "data".into()),
    ]);
    let v = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert!(v.volume_id.starts_with("vol-"));
    assert_eq!(
        v.accessible_topology[0].segments["topology.qcow2.csi.dev/node"],
        NODE
    );
    let layers = p.layers();
    assert_eq!(layers.len(), 1);
    let info = qemu::info(&layers[0]);
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_eq!(info["cluster-size"], 128 << 10);
    assert_eq!(info["format-specific"]["data"]["extended-l2"], true);
    qemu::check_clean(&layers[0]);
}

#[tokio::test]
async fn create_volume_refuses_bad_requests_with_the_spec_codes() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let no_name = create_req("", MIB);
    assert_eq!(code(c.create_volume(no_name).await), Code::InvalidArgument);
    let mut no_caps = create_req("a", MIB);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    let mut multi = create_req("a", MIB);
    multi.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter, "")];
    assert_eq!(code(c.create_volume(multi).await), Code::InvalidArgument);
    let mut fs = create_req("a", MIB);
    fs.volume_capabilities = vec![mount_cap(Mode::SingleNodeWriter, "ntfs")];
    assert_eq!(code(c.create_volume(fs).await), Code::InvalidArgument);
    let mut unknown = create_req("a", MIB);
    unknown.parameters = HashMap::from([("clustersize".into(), "64K".into())]);
    let s = c.create_volume(unknown).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("clustersize"), "{}", s.message());
    let mut neg = create_req("a", MIB);
    neg.capacity_range = Some(CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    });
    assert_eq!(code(c.create_volume(neg).await), Code::InvalidArgument);
    let odd = create_req("a", 5000); // no multiple of 4096 equals 5000
    assert_eq!(code(c.create_volume(odd).await), Code::OutOfRange);
    let mut source = create_req("a", MIB);
    source.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: "vol-x".into(),
            },
        )),
    });
    // A source that does not exist (csi-sanity's "missing source volume").
    assert_eq!(code(c.create_volume(source).await), Code::NotFound);
    let mut elsewhere = create_req("a", MIB);
    elsewhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([("topology.qcow2.csi.dev/node".into(), "node-b".into())]),
        }],
        preferred: vec![],
    });
    assert_eq!(
        code(c.create_volume(elsewhere).await),
        Code::ResourceExhausted
    );
    let long = create_req(&"n".repeat(129), MIB);
    assert_eq!(code(c.create_volume(long).await), Code::InvalidArgument);
    // mkfs options that name host paths or devices, and mount flags off the allowlist.
    for (fs, opts) in [
        ("ext4", "-d /var/lib/kubelet"),
        ("ext4", "-m 0 -J device=/dev/sdb"),
        ("xfs", "-f -l logdev=/dev/sdb"),
        ("xfs", "-p /etc/proto"),
    ] {
        let mut mkfs = create_req("a", MIB);
        mkfs.volume_capabilities = vec![mount_cap(Mode::SingleNodeWriter, fs)];
        mkfs.parameters = HashMap::from([("mkfsOptions".into(), opts.into())]);
        let s = c.create_volume(mkfs).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{opts}");
        assert!(s.message().contains("mkfsOptions"), "{}", s.message());
    }
    let mut flags = create_req("a", MIB);
    let mut cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    if let Some(volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.mount_flags = vec!["noatime".into(), "errors=panic".into()];
    }
    flags.volume_capabilities = vec![cap];
    let s = c.create_volume(flags).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("errors=panic"), "{}", s.message());
    // Past what the engine addresses with 64 KiB clusters (2 PiB).
    let huge = create_req("a", i64::MAX & !4095);
    assert_eq!(code(c.create_volume(huge).await), Code::OutOfRange);
    // Nothing was left behind by the refused requests.
    assert!(p.layers().is_empty());
    assert!(p.records().is_empty());
}

#[tokio::test]
async fn create_volume_is_idempotent_by_name_and_refuses_an_incompatible_repeat() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let name = "x".repeat(128);
    let first = create(&p, &name, 8 * MIB).await;
    for _ in 0..10 {
        let again = create(&p, &name, 8 * MIB).await;
        assert_eq!(again, first);
    }
    assert_eq!(
        code(c.create_volume(create_req(&name, 16 * MIB)).await),
        Code::AlreadyExists
    );
    let mut other_params = create_req(&name, 8 * MIB);
    other_params.parameters = HashMap::from([("clusterSize".into(), "1M".into())]);
    assert_eq!(
        code(c.create_volume(other_params).await),
        Code::AlreadyExists
    );
    // A block capability on the same volume is compatible.
    let mut block = create_req(&name, 8 * MIB);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeSingleWriter)];
    c.create_volume(block).await.unwrap();
    assert_eq!(p.layers().len(), 1);
}

#[tokio::test]
async fn concurrent_identical_creates_make_exactly_one_volume() {
    let p = Plugin::start().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = p.controller().await;
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_req("race", 4 * MIB)).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => ids.push(r.into_inner().volume.unwrap().volume_id),
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert!(!ids.is_empty());
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    // The retry the CO makes after ABORTED gets the same volume.
    assert_eq!(create(&p, "race", 4 * MIB).await.volume_id, ids[0]);
    assert_eq!(p.layers().len(), 1);
    assert_eq!(p.records().len(), 1);
}

#[tokio::test]
async fn delete_volume_removes_the_layer_and_succeeds_for_unknown_ids() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let v = create(&p, "del", 4 * MIB).await;
    assert_eq!(p.layers().len(), 1);
    let del = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        secrets: HashMap::new(),
    };
    assert_eq!(code(c.delete_volume(del("")).await), Code::InvalidArgument);
    c.delete_volume(del("fake-vol-id")).await.unwrap();
    c.delete_volume(del(&format!("vol-{}", "0".repeat(32))))
        .await
        .unwrap();
    c.delete_volume(del(&v.volume_id)).await.unwrap();
    assert!(p.layers().is_empty());
    assert!(p.records().is_empty());
    c.delete_volume(del(&v.volume_id)).await.unwrap();
    // The name is free again, for a new volume.
    assert_ne!(create(&p, "del", 4 * MIB).await.volume_id, v.volume_id);
}

#[tokio::test]
async fn validate_volume_capabilities_follows_the_spec() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let v = create(&p, "val", 4 * MIB).await;
    let req = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let good = vec![mount_cap(Mode::SingleNodeWriter, "xfs")];
    assert_eq!(
        code(c.validate_volume_capabilities(req("", good.clone())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(req(&v.volume_id, vec![]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(req("fake-vol-id", good.clone()))
                .await
        ),
        Code::NotFound
    );
    let ok = c
        .validate_volume_capabilities(req(&v.volume_id, good.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities, good);
    let no = c
        .validate_volume_capabilities(req(
            &v.volume_id,
            vec![mount_cap(Mode::MultiNodeReaderOnly, "")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(
        no.message.contains("MULTI_NODE_READER_ONLY"),
        "{}",
        no.message
    );
}

#[tokio::test]
async fn list_volumes_pages_with_an_opaque_token() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let list = |max: i32, token: &str| ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    assert!(
        c.list_volumes(list(0, ""))
            .await
            .unwrap()
            .into_inner()
            .entries
            .is_empty()
    );
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(create(&p, &format!("v{i}"), 4 * MIB).await.volume_id);
    }
    made.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c.list_volumes(list(2, &token)).await.unwrap().into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.clone().unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    seen.sort();
    assert_eq!(seen, made);
    assert_eq!(
        code(c.list_volumes(list(0, "invalid-token")).await),
        Code::Aborted
    );
    assert_eq!(
        code(c.list_volumes(list(-1, "")).await),
        Code::InvalidArgument
    );
    c.delete_volume(DeleteVolumeRequest {
        volume_id: made[0].clone(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
    let all = c.list_volumes(list(0, "")).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 4);
    assert!(all.next_token.is_empty());
}

#[tokio::test]
async fn get_capacity_reports_free_space_times_the_ratio_for_this_node_only() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let cap = |params: &[(&str, &str)], topo: Option<&str>| GetCapacityRequest {
        volume_capabilities: vec![],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        accessible_topology: topo.map(|n| Topology {
            segments: HashMap::from([("topology.qcow2.csi.dev/node".into(), n.into())]),
        }),
    };
    let one = c.get_capacity(cap(&[], None)).await.unwrap().into_inner();
    assert!(one.available_capacity > 0);
    let here = c
        .get_capacity(cap(&[], Some(NODE)))
        .await
        .unwrap()
        .into_inner();
    assert!(here.available_capacity > 0);
    let two = c
        .get_capacity(cap(&[("overcommitRatio", "2")], None))
        .await
        .unwrap()
        .into_inner();
    let ratio = two.available_capacity as f64 / one.available_capacity as f64;
    assert!((1.9..2.1).contains(&ratio), "ratio {ratio}");
    let there = c
        .get_capacity(cap(&[], Some("node-b")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(there.available_capacity, 0);
    assert_eq!(
        code(c.get_capacity(cap(&[("color", "red")], None)).await),
        Code::InvalidArgument
    );
    // A volume larger than what can be provisioned is refused up front.
    let huge = create_req(
        "huge",
        one.available_capacity.saturating_mul(4) / 4096 * 4096,
    );
    assert_eq!(code(c.create_volume(huge).await), Code::ResourceExhausted);
}

/// Expansion is the node's job (csi-resizer's node-only mode): a cluster-wide resizer would
/// send ControllerExpandVolume to whichever node's plugin leads, not the volume's node.
#[tokio::test]
async fn controller_expand_volume_is_not_offered_and_changes_nothing() {
    if !qemu::require() {
        return;
    }
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let v = create(&p, "grow", 8 * MIB).await;
    let s = c
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 24 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    assert!(s.message().contains("NodeExpandVolume"), "{s:?}");
    assert_eq!(qemu::info(&p.layers()[0])["virtual-size"], 8 * MIB);
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `qos` map of a volume's record on disk.
fn recorded_qos(p: &Plugin, id: &str) -> serde_json::Value {
    let path = p.state.join("volumes").join(format!("{id}.json"));
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    rec.get("qos").cloned().unwrap_or(serde_json::json!({}))
}

#[tokio::test]
async fn qos_parameters_start_a_volume_and_modify_volume_changes_only_what_it_names() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    // StorageClass limits, with the VolumeAttributesClass's over them.
    let mut req = create_req("qos", 8 * MIB);
    req.parameters = params(&[("readIOPS", "1000"), ("writeBytesPerSecond", "20M")]);
    req.mutable_parameters = params(&[("readIOPS", "2000"), ("burstSeconds", "2")]);
    let v = c
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = v.volume_id.clone();
    assert_eq!(
        recorded_qos(&p, &id),
        serde_json::json!({"readIOPS": "2000", "writeBytesPerSecond": "20971520", "burstSeconds": "2"})
    );
    // A repeat of the same create is the same volume.
    let again = c.create_volume(req).await.unwrap().into_inner().volume;
    assert_eq!(again.unwrap().volume_id, id);

    // Only the keys named change; 0 lifts a limit.
    c.controller_modify_volume(ControllerModifyVolumeRequest {
        volume_id: id.clone(),
        mutable_parameters: params(&[("writeBytesPerSecond", "0"), ("writeIOPS", "300")]),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        recorded_qos(&p, &id),
        serde_json::json!({"readIOPS": "2000", "writeIOPS": "300", "burstSeconds": "2"})
    );

    // Bad requests: the spec's codes, and nothing changed.
    for (vol, raw, want, says) in [
        (
            "",
            params(&[("readIOPS", "1")]),
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            id.as_str(),
            params(&[("clusterSize", "64K")]),
            Code::InvalidArgument,
            "clusterSize",
        ),
        (
            id.as_str(),
            params(&[("readIOPS", "lots")]),
            Code::InvalidArgument,
            "readIOPS",
        ),
        (
            "non-existing-volume-id",
            params(&[("readIOPS", "1")]),
            Code::NotFound,
            "no volume",
        ),
        (
            &format!("vol-{}", "b".repeat(32)),
            params(&[("readIOPS", "1")]),
            Code::NotFound,
            "no volume",
        ),
    ] {
        let s = c
            .controller_modify_volume(ControllerModifyVolumeRequest {
                volume_id: vol.into(),
                mutable_parameters: raw,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), want, "{vol}: {s:?}");
        assert!(s.message().contains(says), "{vol}: {s:?}");
    }
    assert_eq!(recorded_qos(&p, &id)["writeIOPS"], "300");

    // A class with keys the plugin does not know is refused at creation too.
    let mut bad = create_req("qos-bad", 8 * MIB);
    bad.mutable_parameters = params(&[("XXX_FakeKey", "XXX_FakeValue")]);
    assert_eq!(code(c.create_volume(bad).await), Code::InvalidArgument);
    let mut bad = create_req("qos-bad", 8 * MIB);
    bad.parameters = params(&[("writeIOPS", "-1")]);
    assert_eq!(code(c.create_volume(bad).await), Code::InvalidArgument);
    assert_eq!(p.records().len(), 1);
}

#[tokio::test]
async fn with_volume_attributes_from_the_api_another_nodes_volume_is_validated_and_accepted() {
    let p = Plugin::start_with_args(&["--watch-volume-attributes"]).await;
    let mut c = p.controller().await;
    let elsewhere = format!("vol-{}", "c".repeat(32));
    c.controller_modify_volume(ControllerModifyVolumeRequest {
        volume_id: elsewhere.clone(),
        mutable_parameters: params(&[("readIOPS", "100")]),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = c
        .controller_modify_volume(ControllerModifyVolumeRequest {
            volume_id: elsewhere,
            mutable_parameters: params(&[("readIOPS", "many")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // A malformed id names no volume anywhere.
    let s = c
        .controller_modify_volume(ControllerModifyVolumeRequest {
            volume_id: "non-existing-volume-id".into(),
            mutable_parameters: params(&[("readIOPS", "100")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
}

#[tokio::test]
async fn unknown_ids_are_not_found_never_invalid() {
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    for id in [
        "fake-vol-id",
        "vol-../../etc/passwd",
        &format!("vol-{}", "a".repeat(32)),
    ] {
        assert_eq!(
            code(
                c.controller_get_volume(ControllerGetVolumeRequest {
                    volume_id: id.into()
                })
                .await
            ),
            Code::NotFound,
            "{id}"
        );
    }
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_a_restart_keeps_every_volume() {
    let mut p = Plugin::start().await;
    let a = create(&p, "a", 4 * MIB).await;
    let b = create(&p, "b", 4 * MIB).await;
    assert!(p.stop().success());
    assert!(!p.socket.exists(), "the socket is removed on exit");
    p.restart_with(&[]).await;
    assert_eq!(create(&p, "a", 4 * MIB).await, a);
    assert_eq!(create(&p, "b", 4 * MIB).await, b);
}

/// SIGTERM while a CreateVolume is half done (paused after its layer, before its record):
/// the plugin stops accepting, lets the call finish and answer, then exits cleanly; the
/// volume it answered with exists after the restart, its layer not collected as an orphan.
#[tokio::test]
async fn sigterm_waits_for_an_operation_in_flight() {
    let mut p = Plugin::start().await;
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", "create-after-layer:sleep=1500")])
        .await;
    let mut c = p.controller().await;
    let call = tokio::spawn(async move { c.create_volume(create_req("pvc", 4 * MIB)).await });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while p.layers().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the create never began"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    p.terminate();
    // A new call during the drain is not served.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let late = match csi::connect(&p.socket).await {
        Ok(ch) => controller_client::ControllerClient::new(ch)
            .create_volume(create_req("late", 4 * MIB))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!late, "no new work is accepted once stopping");
    let created = call.await.unwrap().expect("the call in flight completes");
    let status = p
        .exited_within(std::time::Duration::from_secs(20))
        .expect("the plugin exits after the drain");
    assert!(status.success(), "{status:?}");
    p.restart_with(&[]).await;
    assert_eq!(
        p.layers().len(),
        1,
        "the layer is the volume's, not an orphan"
    );
    assert_eq!(p.records().len(), 1);
    assert_eq!(
        create(&p, "pvc", 4 * MIB).await,
        created.into_inner().volume.unwrap()
    );
}

/// Crashes at `point` during the call `op`, restarts, and returns the plugin for checks.
async fn crash_at(point: &str, setup: impl AsyncFnOnce(&Plugin)) -> Plugin {
    let mut p = Plugin::start().await;
    setup(&p).await;
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", point)]).await;
    p
}

#[tokio::test]
async fn a_crash_during_create_leaves_nothing_or_a_whole_volume() {
    // After the layer, before the record: the layer is an orphan, collected at restart; the
    // CO's retry creates the volume.
    let mut p = crash_at("create-after-layer", async |_| {}).await;
    let mut c = p.controller().await;
    assert!(c.create_volume(create_req("pvc", 4 * MIB)).await.is_err());
    assert!(p.wait_crash(), "the failpoint fired");
    assert_eq!(
        p.layers().len(),
        1,
        "the orphan layer is there before the restart"
    );
    p.restart_with(&[]).await;
    assert!(p.layers().is_empty(), "collected: {:?}", p.layers());
    assert!(p.records().is_empty());
    let v = create(&p, "pvc", 4 * MIB).await;
    assert_eq!(p.layers().len(), 1);

    // After the record, before the reply: the volume exists; the retry returns it.
    let mut p2 = crash_at("create-after-record", async |_| {}).await;
    let mut c2 = p2.controller().await;
    assert!(c2.create_volume(create_req("pvc", 4 * MIB)).await.is_err());
    assert!(p2.wait_crash());
    p2.restart_with(&[]).await;
    let first = create(&p2, "pvc", 4 * MIB).await;
    assert_eq!(create(&p2, "pvc", 4 * MIB).await, first);
    assert_eq!(p2.layers().len(), 1);
    assert_eq!(p2.records().len(), 1);
    drop(v);
}

#[tokio::test]
async fn a_crash_during_delete_leaves_the_volume_gone_and_its_layer_collected() {
    let mut p = Plugin::start().await;
    let v = create(&p, "pvc", 4 * MIB).await;
    let keep = create(&p, "keep", 4 * MIB).await;
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", "delete-after-record")])
        .await;
    let mut c = p.controller().await;
    let del = DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: HashMap::new(),
    };
    assert!(c.delete_volume(del.clone()).await.is_err());
    assert!(p.wait_crash());
    p.restart_with(&[]).await;
    assert_eq!(p.layers().len(), 1, "only the kept volume's layer remains");
    assert_eq!(p.records().len(), 1);
    let mut c = p.controller().await;
    c.delete_volume(del).await.unwrap(); // the CO's retry: already gone, OK
    assert_eq!(create(&p, "keep", 4 * MIB).await, keep);
}

#[tokio::test]
async fn every_rpc_is_logged_once_with_its_ids_and_code_and_secrets_never() {
    const SECRET: &str = "s3cr3t-9f2c1e-never-log-me";
    let mut p = Plugin::start().await;
    // Debug shows the routine calls too, and whatever the libraries below log.
    p.restart_with(&[("RUST_LOG", "debug")]).await;
    let secrets = || HashMap::from([("password".to_string(), SECRET.to_string())]);
    let mut c = p.controller().await;
    let mut req = create_req("pvc-logged", 8 * MIB);
    req.secrets = secrets();
    let vol = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // A failure: a mkfs option off the allowlist, with the secret beside it.
    let mut bad = create_req("pvc-refused", 8 * MIB);
    bad.secrets = secrets();
    bad.parameters = HashMap::from([("mkfsOptions".into(), "-d /etc".into())]);
    assert_eq!(code(c.create_volume(bad).await), Code::InvalidArgument);
    let mut n = p.node().await;
    let stage = NodeStageVolumeRequest {
        volume_id: "vol-0123456789abcdef0123456789abcdef".into(),
        staging_target_path: p.kubelet.join("stage").display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter, "ext4")),
        secrets: secrets(),
        publish_context: HashMap::from([("k".into(), SECRET.into())]),
        volume_context: HashMap::from([("k".into(), SECRET.into())]),
    };
    assert_eq!(code(n.node_stage_volume(stage).await), Code::NotFound);
    c.delete_volume(DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        secrets: secrets(),
    })
    .await
    .unwrap();
    p.identity().await.probe(ProbeRequest {}).await.unwrap();
    p.terminate();
    let _ = p.exited_within(std::time::Duration::from_secs(10));

    let log = p.log();
    assert!(!log.contains(SECRET), "a secret reached the log:\n{log}");
    let ends = |method: &str| -> Vec<&str> {
        log.lines()
            .filter(|l| l.contains(&format!("method={method}")) && l.contains(" took="))
            .collect()
    };
    let created = ends("CreateVolume");
    assert_eq!(created.len(), 2, "one line per call:\n{log}");
    assert!(
        created[0].contains("INFO") && created[0].contains("name=\"pvc-logged\""),
        "{}",
        created[0]
    );
    assert!(created[0].contains("code=Ok"), "{}", created[0]);
    assert!(
        created[1].contains("ERROR")
            && created[1].contains("name=\"pvc-refused\"")
            && created[1].contains("code=InvalidArgument")
            && created[1].contains("mkfsOptions"),
        "{}",
        created[1]
    );
    let staged = ends("NodeStageVolume");
    assert_eq!(staged.len(), 1, "{log}");
    assert!(
        staged[0].contains("ERROR")
            && staged[0].contains("volume=\"vol-0123456789abcdef0123456789abcdef\"")
            && staged[0].contains("code=NotFound"),
        "{}",
        staged[0]
    );
    let deleted = ends("DeleteVolume");
    assert_eq!(deleted.len(), 1, "{log}");
    assert!(
        deleted[0].contains(&format!("volume=\"{}\"", vol.volume_id)),
        "{}",
        deleted[0]
    );
    // The handler's own line carries the call's span.
    assert!(
        log.lines()
            .any(|l| l.contains("method=DeleteVolume") && l.contains("deleted")),
        "{log}"
    );
    // Routine calls are logged too, at debug.
    assert!(ends("Probe").iter().any(|l| l.contains("DEBUG")), "{log}");
}
