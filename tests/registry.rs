//! Plugin bundles through a real OCI registry on loopback: publish, pull and
//! run, pinning by digest, and a registry serving altered or untrusted
//! content refused. (A module of the `plugins` test crate.)

use std::fs;

use sha2::{Digest, Sha256};

use crate::bundles::{Setup, pt_host};
use crate::common::{arg as s, assert_ok, component, repo, stderr, stdout};
use crate::oci_registry::LoopbackRegistry;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `pt-host plugin publish BUNDLE REFERENCE`: the pinned reference it prints.
fn publish(bundle: &std::path::Path, reference: &str) -> String {
    let output = pt_host(&["plugin", "publish", s(bundle), reference]);
    assert_ok(&output);
    let printed = stdout(&output);
    printed
        .lines()
        .find_map(|line| line.strip_prefix("pinned: "))
        .unwrap_or_else(|| panic!("no pinned reference in {printed}"))
        .to_string()
}

fn pull(setup: &Setup, reference: &str) -> std::process::Output {
    pt_host(
        &[
            vec!["plugin".into(), "pull".into(), reference.to_string()],
            setup.dirs(),
        ]
        .concat(),
    )
}

fn report(setup: &Setup, out: &str) -> serde_json::Value {
    serde_json::from_slice(&fs::read(setup.path(out).join("data_report.json")).unwrap()).unwrap()
}

#[test]
fn publish_pull_and_run_through_a_registry_pinned_by_digest() {
    let Some(registry) = LoopbackRegistry::start("registry round trip") else {
        return;
    };
    let setup = Setup::new();
    let repository = format!("{}/plugins/medical_clean", registry.host);
    // Without a tag the bundle's version is the tag.
    let pinned = publish(&setup.bundle(), &repository);
    let digest = pinned.rsplit_once('@').unwrap().1.to_string();
    assert_eq!(pinned, format!("{repository}@{digest}"));
    // Publishing is reproducible: the same bundle, the same digest.
    assert_eq!(publish(&setup.bundle(), &repository), pinned);

    // What the registry holds is a Wasm OCI artifact: a Wasm config and one
    // application/wasm layer that is the bundle's component, with the
    // signed bundle attached as a referrer.
    let (status, body) = registry.get("/v2/plugins/medical_clean/manifests/0.1.0", OCI_MANIFEST);
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), digest, "the tag names the pinned manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], "application/wasm");
    let bundle_bytes = fs::read(setup.bundle()).unwrap();
    let bundle = pt_bundle::Bundle::from_bytes(&bundle_bytes, "test").unwrap();
    assert_eq!(layers[0]["digest"], sha256(bundle.component()));
    assert_eq!(
        manifest["annotations"]["dev.pt-host.bundle.digest"],
        sha256(&bundle_bytes)
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.version"],
        "0.1.0"
    );
    let (_, config) = registry.get(
        &format!(
            "/v2/plugins/medical_clean/blobs/{}",
            manifest["config"]["digest"].as_str().unwrap()
        ),
        "*/*",
    );
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["os"], "wasip2");
    assert_eq!(config["architecture"], "wasm");
    let (status, referrers) = registry.get(
        &format!(
            "/v2/plugins/medical_clean/manifests/{}",
            digest.replace(':', "-")
        ),
        "application/vnd.oci.image.index.v1+json",
    );
    assert_eq!(status, 200, "the referrers tag-schema index");
    let referrers: serde_json::Value = serde_json::from_slice(&referrers).unwrap();
    assert_eq!(
        referrers["manifests"][0]["artifactType"],
        "application/vnd.pt-host.plugin.bundle.v1"
    );

    // Pull installs exactly the published bundle.
    let pulled = pull(&setup, &format!("{repository}:0.1.0"));
    assert_ok(&pulled);
    assert!(stdout(&pulled).contains(&format!("installed medical_clean@0.1.0 from {pinned}")));
    let blob = setup
        .path("store/blobs")
        .join(format!("{}.ptplugin", &sha256(&bundle_bytes)[7..]));
    assert_eq!(fs::read(blob).unwrap(), bundle_bytes);

    // A run takes the reference directly, and records the digest it pinned.
    assert_ok(&setup.prepare(s(&component("medical_clean")), "wasm"));
    assert_ok(&setup.prepare(&format!("{repository}:0.1.0"), "by-tag"));
    let by_tag = report(&setup, "by-tag");
    assert_eq!(by_tag["plugins"][0]["source"], pinned.as_str());
    assert_eq!(by_tag["train"], report(&setup, "wasm")["train"]);

    // The tag moves to a re-release (same component, another README): the
    // digest still names the original bundle, the tag the new one.
    let release = setup.path("release");
    fs::create_dir_all(release.join("fixtures")).unwrap();
    let source = repo().join("plugins/medical_clean");
    for file in ["plugin.toml", "config.schema.json", "fixtures/cases.jsonl"] {
        fs::copy(source.join(file), release.join(file)).unwrap();
    }
    fs::write(release.join("README.md"), "medical_clean, re-released.\n").unwrap();
    setup.pack_plugin_from(&component("medical_clean"), &release, "other");
    let moved = publish(
        &setup.path("other/medical_clean-0.1.0.ptplugin"),
        &format!("{repository}:0.1.0"),
    );
    assert_ne!(moved, pinned);
    assert_ok(&setup.prepare(&format!("{repository}:0.1.0"), "moved"));
    assert_eq!(
        report(&setup, "moved")["plugins"][0]["source"],
        moved.as_str()
    );
    assert_ok(&setup.prepare(&pinned, "pinned"));
    assert_eq!(
        report(&setup, "pinned")["plugins"][0]["source"],
        pinned.as_str()
    );

    // A digest pulled before runs without the registry; a tag needs it.
    drop(registry);
    let offline = setup.prepare(&pinned, "offline");
    assert_ok(&offline);
    assert_eq!(
        report(&setup, "offline")["plugins"][0]["source"],
        pinned.as_str()
    );
    let unreachable = setup.prepare(&format!("{repository}:0.1.0"), "unreachable");
    assert!(!unreachable.status.success());
    assert!(
        stderr(&unreachable).contains(&format!("--plugin {repository}:0.1.0")),
        "{}",
        stderr(&unreachable)
    );
}

#[test]
fn a_registry_serving_untrusted_or_altered_bundles_is_refused() {
    let Some(registry) = LoopbackRegistry::start("registry tampering") else {
        return;
    };
    let setup = Setup::new();

    // Unsigned bundles are not published.
    let unsigned = setup.path("unsigned");
    assert_ok(&pt_host(&[
        "plugin",
        "pack",
        "--component",
        s(&component("medical_clean")),
        "--plugin_dir",
        s(&repo().join("plugins/medical_clean")),
        "--output_dir",
        s(&unsigned),
    ]));
    let refused = pt_host(&[
        "plugin",
        "publish",
        s(&unsigned.join("medical_clean-0.1.0.ptplugin")),
        &format!("{}/plugins/unsigned", registry.host),
    ]);
    assert!(
        stderr(&refused).contains("not signed"),
        "{}",
        stderr(&refused)
    );

    // Signed by a key the puller does not trust: published, but not installed.
    let mallory = setup.signed_by_mallory();
    let untrusted = format!("{}/plugins/mallory:0.1.0", registry.host);
    publish(&mallory, &untrusted);
    let output = pull(&setup, &untrusted);
    assert!(
        stderr(&output).contains("which is not trusted"),
        "{}",
        stderr(&output)
    );
    let run = setup.prepare(&untrusted, "untrusted");
    assert!(
        stderr(&run).contains("which is not trusted"),
        "{}",
        stderr(&run)
    );

    // The registry's copy of the bundle altered in storage: the digest check refuses it.
    let reference = format!("{}/plugins/medical_clean:0.1.0", registry.host);
    publish(&setup.bundle(), &reference);
    let bundle_digest = sha256(&fs::read(setup.bundle()).unwrap());
    let stored = registry.blob_file(&bundle_digest);
    let mut bytes = fs::read(&stored).unwrap();
    let last = bytes.len() - 3000;
    bytes[last] ^= 1;
    fs::write(&stored, bytes).unwrap();
    let output = pull(&setup, &reference);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("digest"), "{}", stderr(&output));
    let list = pt_host(&[vec!["plugin".to_string(), "list".into()], setup.dirs()].concat());
    assert!(
        stdout(&list).contains("no plugins installed"),
        "{}",
        stdout(&list)
    );
}
