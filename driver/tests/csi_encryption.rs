//! Encrypted volumes (`encrypted: "true"`): the passphrase comes from the provisioner and
//! node-stage secrets; a volume's layers, snapshots, restores, clones and flattened copies
//! are LUKS-encrypted with one key; no plaintext reaches a layer file; qemu-img with the
//! secret reads the volume; a wrong or missing secret is a clear error that touches
//! nothing; a restarted plugin reopens staged encrypted volumes from its key store. Run
//! on nbdfuse + loop on the host and on kernel nbd inside user-mode Linux.

#[allow(dead_code)]
#[path = "support/csi.rs"]
mod csi;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)]
mod support;
#[path = "support/uml.rs"]
mod uml;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use csi::{Plugin, block_cap, code, from_snapshot, from_volume, member};
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::*;
use support::sh;
use tonic::Code;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const PASS: &str = "correct horse battery staple";
/// The start of every pattern block: searched for in the layer files.
const MARKER: &[u8] = b"qcow2-csi plaintext marker ";

fn secrets(pass: &str) -> HashMap<String, String> {
    HashMap::from([("passphrase".to_string(), pass.to_string())])
}

/// An encrypted class with a cheap key slot (the tests make and unlock many).
fn encrypted_class() -> HashMap<String, String> {
    HashMap::from([
        ("encrypted".to_string(), "true".to_string()),
        ("encryptionIterTime".to_string(), "20".to_string()),
    ])
}

async fn create(
    p: &Plugin,
    name: &str,
    parameters: HashMap<String, String>,
    secrets: HashMap<String, String>,
    source: Option<volume_content_source::Type>,
) -> Result<String, tonic::Status> {
    p.controller()
        .await
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: SIZE as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
            parameters,
            secrets,
            volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

fn staging_of(p: &Plugin, id: &str) -> PathBuf {
    p.kubelet.join(format!("staging-{id}"))
}

async fn stage(
    p: &Plugin,
    id: &str,
    secrets: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    let staging = staging_of(p, id);
    std::fs::create_dir_all(&staging).unwrap();
    p.node()
        .await
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(block_cap(Mode::SingleNodeWriter)),
            secrets,
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn unstage(p: &Plugin, id: &str) {
    p.node()
        .await
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging_of(p, id).display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unstage {id}: {e}\n{}", p.log()));
}

/// 1 MiB of 4 KiB blocks, each the marker, then `tag` and the block's number.
fn pattern(tag: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(MIB as usize);
    for block in 0..256u32 {
        let mut b = MARKER.to_vec();
        b.push(tag);
        b.extend_from_slice(&block.to_le_bytes());
        b.resize(4096, tag);
        v.extend_from_slice(&b);
    }
    v
}

/// Writes `tag`'s pattern at MiB `at` of the device, direct and synced.
fn write(p: &Plugin, dev: &str, tag: u8, at: u64) {
    let file = p.dir.path().join(format!("pattern-{tag}"));
    std::fs::write(&file, pattern(tag)).unwrap();
    sh(&format!(
        "dd if={} of={dev} bs=1M seek={at} count=1 oflag=direct conv=fsync,notrunc status=none",
        file.display()
    ));
}

/// The MiB at MiB `at` of the device, read direct.
fn read(p: &Plugin, dev: &str, at: u64) -> Vec<u8> {
    let file = p.dir.path().join("read");
    sh(&format!(
        "dd if={dev} of={} bs=1M skip={at} count=1 iflag=direct status=none",
        file.display()
    ));
    std::fs::read(file).unwrap()
}

fn expect(p: &Plugin, dev: &str, at: u64, tag: Option<u8>) {
    let got = read(p, dev, at);
    let want = tag.map_or(vec![0u8; MIB as usize], pattern);
    assert!(got == want, "MiB {at} of {dev} is not pattern {tag:?}");
}

fn key_file(p: &Plugin, id: &str) -> PathBuf {
    p.keys.path().join("keys").join(id)
}

/// Every layer file: LUKS-encrypted (qemu-img info), free of every pattern's marker, and
/// clean to `qemu-img check` with the secret.
fn check_layers(p: &Plugin) {
    let layers = p.layers();
    assert!(!layers.is_empty());
    for layer in &layers {
        let bytes = std::fs::read(layer).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "{} holds plaintext",
            layer.display()
        );
        let info = qemu::info_shared(layer);
        assert_eq!(
            info["encrypted"],
            true,
            "{} is not encrypted: {info}",
            layer.display()
        );
        qemu::check_clean_with(layer, Some(PASS));
    }
}

/// The volume's content as qemu-img reads it with the secret (the whole chain).
fn qemu_reads(p: &Plugin, id: &str, at: u64, tag: Option<u8>) {
    let head = p.head_of(id);
    let raw = p.dir.path().join(format!("{id}.raw"));
    let _ = std::fs::remove_file(&raw);
    sh(&format!(
        "qemu-img convert -U --object secret,id=sec0,data='{PASS}' --image-opts '{}' -O raw {}",
        qemu::secret_opts(&head),
        raw.display()
    ));
    let bytes = std::fs::read(&raw).unwrap();
    let got = &bytes[(at * MIB) as usize..((at + 1) * MIB) as usize];
    let want = tag.map_or(vec![0u8; MIB as usize], pattern);
    assert!(
        got == want.as_slice(),
        "qemu-img reads MiB {at} of {id} as other than {tag:?}"
    );
    std::fs::remove_file(&raw).unwrap();
}

async fn wait_for_log(p: &Plugin, what: &str) {
    wait_for_line(p, &[what]).await;
}

/// Waits until one line of the log holds every one of `words`.
async fn wait_for_line(p: &Plugin, words: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let found = || p.log().lines().any(|l| words.iter().all(|w| l.contains(w)));
    while !found() {
        let what = words.join(" ");
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the plugin is restarted while the volume is staged (kernel nbd only).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Restarts {
    None,
    CrashAndHandover,
}

/// Stage, write, snapshot, restore, clone, flatten (chains past two layers) and unstage an
/// encrypted block volume, checking the data through the devices and through qemu-img, and
/// the layer files for plaintext.
async fn encrypted_flow(attach: &str, restarts: Restarts) {
    let mut p = Plugin::start_with_args(&["--attach", attach, "--max-chain-depth", "2"]).await;
    let vol = create(&p, "pvc-enc", encrypted_class(), secrets(PASS), None)
        .await
        .unwrap();
    stage(&p, &vol, secrets(PASS)).await.unwrap();
    let key = key_file(&p, &vol);
    assert_eq!(std::fs::read(&key).unwrap(), PASS.as_bytes());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A repeat is fine; a repeat with another passphrase is not.
    stage(&p, &vol, secrets(PASS)).await.unwrap();
    assert_eq!(
        code(stage(&p, &vol, secrets("other")).await),
        Code::InvalidArgument
    );
    let dev = p.staged_device(&vol);
    write(&p, &dev, b'A', 0);
    write(&p, &dev, b'A', 8);

    if restarts == Restarts::CrashAndHandover {
        // After a crash the next process reattaches the device with the kept passphrase;
        // after a planned restart it is handed over. Writes go on through the same device.
        p.kill9();
        p.spawn(&[]);
        p.wait_ready().await;
        wait_for_log(&p, "reattached").await;
        write(&p, &dev, b'C', 24);
        p.terminate();
        p.spawn(&[]);
        p.wait_ready().await;
        wait_for_log(&p, "took over").await;
        expect(&p, &dev, 24, Some(b'C'));
    }

    let snap = p.snapshot(&vol, "snap-1").await.unwrap();
    write(&p, &dev, b'B', 8);
    write(&p, &dev, b'B', 16);

    // A restore and a clone keep the source's key: the same secret opens them.
    let restored = create(
        &p,
        "pvc-restored",
        encrypted_class(),
        secrets(PASS),
        from_snapshot(&snap),
    )
    .await
    .unwrap();
    let clone = create(
        &p,
        "pvc-clone",
        encrypted_class(),
        secrets(PASS),
        from_volume(&vol),
    )
    .await
    .unwrap();
    // The clone froze the staged volume's head again: three layers, past the limit of two,
    // flattened in the background into a copy encrypted with the same key. The clone's
    // chain is as deep, but without its passphrase it waits for its stage.
    wait_for_line(&p, &["flattened", &vol]).await;
    wait_for_line(&p, &["once the volume is staged", &clone]).await;
    for (id, zero_at_16, eight) in [(&restored, true, b'A'), (&clone, false, b'B')] {
        stage(&p, id, secrets(PASS)).await.unwrap();
        let d = p.staged_device(id);
        expect(&p, &d, 0, Some(b'A'));
        expect(&p, &d, 8, Some(eight));
        expect(&p, &d, 16, (!zero_at_16).then_some(b'B'));
        if id == &clone {
            wait_for_line(&p, &["flattened", &clone]).await;
            expect(&p, &d, 8, Some(eight));
        }
        unstage(&p, id).await;
        assert!(!key_file(&p, id).exists(), "the key outlived the stage");
    }
    expect(&p, &dev, 0, Some(b'A'));
    expect(&p, &dev, 8, Some(b'B'));

    // A group snapshot of the staged volume and the unstaged restore: the staged head is
    // pivoted onto a new head with the same key, and the device writes on through it.
    let group = p
        .group_snapshot("group", &[&vol, &restored])
        .await
        .unwrap_or_else(|e| panic!("group snapshot: {e}\n{}", p.log()));
    write(&p, &dev, b'D', 32);
    expect(&p, &dev, 8, Some(b'B'));
    expect(&p, &dev, 32, Some(b'D'));
    let member_id = member(&group, &vol).snapshot_id.clone();
    let from_group = create(
        &p,
        "pvc-from-group",
        encrypted_class(),
        secrets(PASS),
        from_snapshot(&member_id),
    )
    .await
    .unwrap();
    unstage(&p, &vol).await;
    assert!(!key.exists(), "the key outlived the stage");

    // A wrong or missing node-stage secret: a clear error, nothing staged or kept.
    assert_eq!(
        code(stage(&p, &vol, secrets("wrong")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(stage(&p, &vol, HashMap::new()).await),
        Code::InvalidArgument
    );
    assert!(!key.exists());
    assert!(!p.state.join(format!("staged/{vol}.json")).exists());

    qemu_reads(&p, &vol, 0, Some(b'A'));
    qemu_reads(&p, &vol, 8, Some(b'B'));
    qemu_reads(&p, &vol, 16, Some(b'B'));
    qemu_reads(&p, &restored, 8, Some(b'A'));
    qemu_reads(&p, &restored, 16, None);
    qemu_reads(&p, &vol, 32, Some(b'D'));
    qemu_reads(&p, &from_group, 8, Some(b'B'));
    qemu_reads(&p, &from_group, 32, None);
    if restarts == Restarts::CrashAndHandover {
        qemu_reads(&p, &vol, 24, Some(b'C'));
    }
    check_layers(&p);
    assert!(p.stop().success(), "{}", p.log());
    assert!(!p.log().contains(PASS), "the passphrase was logged");
}

fn node_runnable() -> bool {
    support::runnable(
        "encrypted node tests",
        support::root_attach_missing(&["nbdfuse", "losetup", "qemu-img"]),
    )
}

#[tokio::test]
async fn an_encrypted_volume_stages_snapshots_restores_clones_and_flattens_on_nbdfuse() {
    if node_runnable() {
        encrypted_flow("nbdfuse", Restarts::None).await;
    }
}

#[test]
fn an_encrypted_volume_survives_restarts_and_flattens_on_kernel_nbd() {
    if !uml::enter("an_encrypted_volume_survives_restarts_and_flattens_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(encrypted_flow("nbd", Restarts::CrashAndHandover));
}

/// What is refused, and that a refusal leaves nothing behind: no layer, no record, no key.
#[tokio::test]
async fn wrong_or_missing_secrets_and_mismatched_sources_are_refused_and_change_nothing() {
    if !qemu::require() {
        return;
    }
    let p = Plugin::start().await;
    let before = (p.layers(), p.records());
    // No secret, an empty one, an unknown key in it.
    for s in [
        HashMap::new(),
        secrets(""),
        HashMap::from([("password".to_string(), PASS.to_string())]),
    ] {
        let r = create(&p, "pvc-x", encrypted_class(), s, None).await;
        assert_eq!(code(r), Code::InvalidArgument);
    }
    assert_eq!((p.layers(), p.records()), before);

    let enc = create(&p, "pvc-enc", encrypted_class(), secrets(PASS), None)
        .await
        .unwrap();
    let head = p.head_of(&enc);
    let info = qemu::info(&head);
    assert_eq!(info["encrypted"], true, "{info}");
    assert_eq!(
        info["format-specific"]["data"]["extended-l2"], true,
        "encrypted volumes default to subclusters: {info}"
    );
    // qemu-img opens it with the secret, and finds it clean and empty.
    qemu::check_clean_with(&head, Some(PASS));
    let plain = create(&p, "pvc-plain", HashMap::new(), HashMap::new(), None)
        .await
        .unwrap();
    let snap = p.snapshot(&enc, "snap-enc").await.unwrap();
    let plain_snap = p.snapshot(&plain, "snap-plain").await.unwrap();
    let before = (p.layers(), p.records());
    for (name, class, s, source) in [
        // An encrypted source into an unencrypted class.
        ("a", HashMap::new(), secrets(PASS), from_snapshot(&snap)),
        ("b", HashMap::new(), HashMap::new(), from_volume(&enc)),
        // A wrong passphrase for the source's key.
        (
            "c",
            encrypted_class(),
            secrets("wrong"),
            from_snapshot(&snap),
        ),
        ("d", encrypted_class(), secrets("wrong"), from_volume(&enc)),
        // An unencrypted source into an encrypted class.
        (
            "e",
            encrypted_class(),
            secrets(PASS),
            from_snapshot(&plain_snap),
        ),
        ("f", encrypted_class(), secrets(PASS), from_volume(&plain)),
    ] {
        let r = create(&p, name, class, s, source).await;
        let status = r.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(!status.message().contains(PASS) && !status.message().contains("wrong"));
    }
    assert_eq!(
        (p.layers(), p.records()),
        before,
        "a refusal changed the state"
    );

    // A group snapshot of an encrypted and a plain volume: each new head keeps its volume's
    // encryption (the encrypted one its key: the passphrase opens it, no other does).
    let group = p.group_snapshot("group", &[&enc, &plain]).await.unwrap();
    assert_eq!(group.snapshots.len(), 2);
    assert_eq!(qemu::info(&p.head_of(&enc))["encrypted"], true);
    assert_ne!(qemu::info(&p.head_of(&plain))["encrypted"], true);
    qemu::check_clean_with(&p.head_of(&enc), Some(PASS));
    let member_id = member(&group, &enc).snapshot_id.clone();
    let wrong = create(
        &p,
        "g",
        encrypted_class(),
        secrets("wrong"),
        from_snapshot(&member_id),
    )
    .await;
    assert_eq!(code(wrong), Code::InvalidArgument);
    create(
        &p,
        "g",
        encrypted_class(),
        secrets(PASS),
        from_snapshot(&member_id),
    )
    .await
    .unwrap();

    // The node: no secret, or a wrong one, refused before anything is attached or kept
    // (this part needs no device: the head is unlocked first).
    assert_eq!(
        code(stage(&p, &enc, HashMap::new()).await),
        Code::InvalidArgument
    );
    let wrong = stage(&p, &enc, secrets("wrong")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument, "{wrong:?}");
    assert!(wrong.message().contains("passphrase"), "{wrong:?}");
    assert!(!key_file(&p, &enc).exists());
    assert!(!p.state.join(format!("staged/{enc}.json")).exists());
    assert!(!p.log().contains(PASS), "the passphrase was logged");
}

/// A key directory on a disk is refused at the stage, before a device exists.
#[tokio::test]
async fn a_key_dir_on_a_disk_is_refused() {
    let disk = tempfile::tempdir().unwrap();
    if sh(&format!("stat -f -c %T {}", disk.path().display())).trim() == "tmpfs" {
        eprintln!("skipped: the temporary directory is on tmpfs here");
        return;
    }
    let keys = disk.path().join("keys");
    let p = Plugin::start_with_args(&["--key-dir", keys.to_str().unwrap()]).await;
    let enc = create(&p, "pvc-enc", encrypted_class(), secrets(PASS), None)
        .await
        .unwrap();
    let refused = stage(&p, &enc, secrets(PASS)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("tmpfs"), "{refused:?}");
    assert!(!keys.join(&enc).exists());
    assert!(!p.state.join(format!("staged/{enc}.json")).exists());
    assert!(p.log().contains("refused to keep a passphrase on a disk"));
}
