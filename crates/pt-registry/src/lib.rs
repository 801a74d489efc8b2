//! Plugin bundles in OCI registries.
//!
//! A published plugin is a standard Wasm OCI artifact (config
//! `application/vnd.wasm.config.v0+json`, one `application/wasm` layer: the
//! component), so registries and Wasm tools (wkg, wasmtime) see a component.
//! The signed bundle (manifest, signature, WIT, README, fixtures) is attached
//! to it as an OCI 1.1 referrer, the way cosign attaches signatures; for
//! registries without the referrers API the tag-schema index `sha256-HEX`
//! lists it too.
//!
//! The Wasm manifest's annotations name the bundle's digest, so the manifest
//! digest pins the whole signed bundle, not just the component: pulling by
//! digest always yields the same bytes, and a pulled bundle whose component
//! is not the published layer is refused. Checking the signature is the
//! caller's job, as for any bundle.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol, ImageLayer};
use oci_client::manifest::{
    ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
    OciImageIndex, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_wasm::{ToConfig, WASM_MANIFEST_MEDIA_TYPE, WasmClient, WasmConfig};
use pt_bundle::Bundle;
use sha2::{Digest, Sha256};

/// The referrer artifact that carries a signed bundle.
pub const BUNDLE_ARTIFACT_TYPE: &str = "application/vnd.pt-host.plugin.bundle.v1";
/// Its single layer: the `.ptplugin` archive.
pub const BUNDLE_LAYER_MEDIA_TYPE: &str = "application/vnd.pt-host.plugin.bundle.v1.tar";
/// Annotation of the Wasm manifest naming the attached bundle's digest.
pub const BUNDLE_DIGEST_ANNOTATION: &str = "dev.pt-host.bundle.digest";
const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";

/// A reference as given with an `oci://` prefix, or without one when it starts
/// with a registry host (a name with a dot or port, or `localhost`) and is
/// followed by a repository: `ghcr.io/org/plugin:1.0`, `localhost:5000/p@sha256:...`.
pub fn looks_like_reference(text: &str) -> bool {
    if text.starts_with("oci://") {
        return true;
    }
    let Some((host, rest)) = text.split_once('/') else {
        return false;
    };
    !rest.is_empty()
        && !text.ends_with(".wasm")
        && !text.ends_with(".ptplugin")
        && (host.contains('.') || host.contains(':') || host == "localhost")
        && host != "."
        && host != ".."
}

fn parse(text: &str) -> Result<Reference> {
    let text = text.strip_prefix("oci://").unwrap_or(text);
    text.parse().with_context(|| {
        format!("`{text}` is not an OCI reference (REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST])")
    })
}

/// `REGISTRY/REPOSITORY@sha256:...` when `text` names a digest (as pulls
/// record it in the store), `None` for a tag.
pub fn pinned(text: &str) -> Result<Option<String>> {
    let reference = parse(text)?;
    Ok(reference
        .digest()
        .map(|digest| pinned_name(&reference, digest)))
}

/// Whether the reference names a tag or digest, rather than defaulting to `latest`.
fn has_tag_or_digest(text: &str) -> bool {
    text.rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'))
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(host, _)| host);
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

/// Credentials for `registry`: `PT_REGISTRY_USERNAME`/`PT_REGISTRY_PASSWORD`,
/// else an `auth` entry of Docker's config (what `docker login` writes), else none.
fn credentials(registry: &str) -> Result<RegistryAuth> {
    if let (Ok(user), Ok(password)) = (
        std::env::var("PT_REGISTRY_USERNAME"),
        std::env::var("PT_REGISTRY_PASSWORD"),
    ) {
        return Ok(RegistryAuth::Basic(user, password));
    }
    let config = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))
        .map(|dir| dir.join("config.json"));
    let Some(text) = config.and_then(|path| std::fs::read(path).ok()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let config: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
    let encoded = config["auths"]
        .as_object()
        .into_iter()
        .flatten()
        .find(|(key, _)| {
            let key = key
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            key.split('/').next() == Some(registry)
        })
        .and_then(|(_, entry)| entry["auth"].as_str());
    let Some(encoded) = encoded else {
        return Ok(RegistryAuth::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .with_context(|| format!("docker config: malformed `auth` for {registry}"))?;
    let (user, password) = decoded
        .split_once(':')
        .with_context(|| format!("docker config: `auth` for {registry} is not USER:PASSWORD"))?;
    Ok(RegistryAuth::Basic(user.into(), password.into()))
}

/// What `publish` pushed.
#[derive(Debug, Clone)]
pub struct Published {
    /// `REGISTRY/REPOSITORY:TAG` as pushed.
    pub tagged: String,
    /// `REGISTRY/REPOSITORY@sha256:...`: the Wasm manifest, which pins the bundle.
    pub pinned: String,
    /// sha256 of the bundle archive.
    pub bundle_digest: String,
}

/// What `pull` fetched: the bundle (not yet verified against trusted keys).
pub struct Pulled {
    pub bundle: Bundle,
    /// `REGISTRY/REPOSITORY@sha256:...` of the Wasm manifest.
    pub pinned: String,
}

/// A client for OCI registries. HTTPS, except for loopback registries and
/// those named in `plain_http` (a private registry without TLS, as Docker's
/// `insecure-registries`).
pub struct Registry {
    runtime: tokio::runtime::Runtime,
    plain_http: Vec<String>,
}

impl Registry {
    pub fn new(plain_http: Vec<String>) -> Result<Self> {
        // reqwest is built without a default crypto provider (see Cargo.toml);
        // an error only means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the registry client")?;
        Ok(Self {
            runtime,
            plain_http,
        })
    }

    fn client(&self, reference: &Reference) -> Client {
        let mut plain_http = self.plain_http.clone();
        if is_loopback(reference.resolve_registry()) {
            plain_http.push(reference.resolve_registry().to_string());
        }
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http),
            ..Default::default()
        })
    }

    /// Pushes `bundle` (which the caller has checked is signed) to `reference`;
    /// without a tag, the bundle's version is the tag.
    pub fn publish(&self, bundle: &Bundle, reference: &str) -> Result<Published> {
        let mut target = parse(reference)?;
        if !has_tag_or_digest(reference.strip_prefix("oci://").unwrap_or(reference)) {
            target = Reference::with_tag(
                target.registry().into(),
                target.repository().into(),
                bundle.manifest.version.clone(),
            );
        }
        if target.digest().is_some() {
            bail!("{reference}: publish to a tag (REPOSITORY:TAG); the digest is computed");
        }
        let client = self.client(&target);
        let auth = credentials(target.resolve_registry())?;
        self.runtime
            .block_on(push(&client, &auth, &target, bundle))
            .with_context(|| format!("cannot publish to {}", target.whole()))
    }

    /// Fetches the bundle at `reference` (a tag is resolved to its digest).
    pub fn pull(&self, reference: &str) -> Result<Pulled> {
        let source = parse(reference)?;
        let client = self.client(&source);
        let auth = credentials(source.resolve_registry())?;
        self.runtime
            .block_on(fetch(client, &auth, &source))
            .with_context(|| format!("cannot pull {}", source.whole()))
    }
}

async fn push_manifest(
    client: &Client,
    target: &Reference,
    manifest: &impl serde::Serialize,
    media_type: &str,
) -> Result<(String, usize)> {
    let bytes = serde_json::to_vec(manifest)?;
    let digest = sha256_digest(&bytes);
    let size = bytes.len();
    client
        .push_manifest_raw(target, bytes, media_type.parse()?)
        .await?;
    Ok((digest, size))
}

async fn push(
    client: &Client,
    auth: &RegistryAuth,
    target: &Reference,
    bundle: &Bundle,
) -> Result<Published> {
    client
        .store_auth_if_needed(target.resolve_registry(), auth)
        .await;
    let bundle_bytes = bundle.to_bytes()?;
    let bundle_digest = sha256_digest(&bundle_bytes);

    // The component, as a Wasm OCI artifact. `created` is fixed so that the same
    // bundle always publishes to the same digest.
    let (mut wasm_config, component) =
        WasmConfig::from_raw_component(bundle.component().to_vec(), bundle.signer())?;
    wasm_config.created = chrono::DateTime::UNIX_EPOCH;
    let config = wasm_config.to_config()?;
    let manifest_info = &bundle.manifest;
    let annotations = BTreeMap::from([
        (
            "org.opencontainers.image.title".into(),
            manifest_info.id.clone(),
        ),
        (
            "org.opencontainers.image.version".into(),
            manifest_info.version.clone(),
        ),
        (
            "org.opencontainers.image.description".into(),
            manifest_info.description.clone(),
        ),
        (
            "org.opencontainers.image.licenses".into(),
            manifest_info.license.clone(),
        ),
        (
            "dev.pt-host.plugin.interface".into(),
            manifest_info.interface.clone(),
        ),
        (BUNDLE_DIGEST_ANNOTATION.into(), bundle_digest.clone()),
    ]);
    let mut manifest =
        OciImageManifest::build(std::slice::from_ref(&component), &config, Some(annotations));
    manifest.media_type = Some(WASM_MANIFEST_MEDIA_TYPE.into());
    client
        .push_blob(target, component.data.clone(), &component.sha256_digest())
        .await?;
    client
        .push_blob(target, config.data.clone(), &manifest.config.digest)
        .await?;
    let (digest, size) = push_manifest(client, target, &manifest, WASM_MANIFEST_MEDIA_TYPE).await?;
    let pinned = target.clone_with_digest(digest.clone());

    // The signed bundle, as a referrer of that manifest.
    let bundle_layer = ImageLayer::new(bundle_bytes, BUNDLE_LAYER_MEDIA_TYPE.into(), None);
    client
        .push_blob(&pinned, bundle_layer.data.clone(), &bundle_digest)
        .await?;
    client
        .push_blob(&pinned, EMPTY_CONFIG, &sha256_digest(EMPTY_CONFIG))
        .await?;
    let referrer = OciImageManifest {
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        artifact_type: Some(BUNDLE_ARTIFACT_TYPE.into()),
        config: OciDescriptor {
            media_type: EMPTY_CONFIG_MEDIA_TYPE.into(),
            digest: sha256_digest(EMPTY_CONFIG),
            size: EMPTY_CONFIG.len() as i64,
            ..Default::default()
        },
        layers: vec![OciDescriptor {
            media_type: BUNDLE_LAYER_MEDIA_TYPE.into(),
            digest: bundle_digest.clone(),
            size: bundle_layer.data.len() as i64,
            ..Default::default()
        }],
        subject: Some(OciDescriptor {
            media_type: WASM_MANIFEST_MEDIA_TYPE.into(),
            digest: digest.clone(),
            size: size as i64,
            ..Default::default()
        }),
        ..Default::default()
    };
    let referrer_digest = sha256_digest(&serde_json::to_vec(&referrer)?);
    let (referrer_digest, referrer_size) = push_manifest(
        client,
        &pinned.clone_with_digest(referrer_digest),
        &referrer,
        OCI_IMAGE_MEDIA_TYPE,
    )
    .await?;
    add_to_referrers_tag(
        client,
        target,
        &digest,
        ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.into(),
            digest: referrer_digest,
            size: referrer_size as i64,
            platform: None,
            annotations: None,
            artifact_type: Some(BUNDLE_ARTIFACT_TYPE.into()),
        },
    )
    .await?;
    Ok(Published {
        tagged: target.whole(),
        pinned: pinned_name(target, &digest),
        bundle_digest,
    })
}

fn pinned_name(reference: &Reference, digest: &str) -> String {
    format!(
        "{}/{}@{digest}",
        reference.registry(),
        reference.repository()
    )
}

/// The referrers tag schema (`sha256-HEX` → an index of referrers), which
/// readers fall back to where the registry has no referrers API. Other
/// referrers already listed (signatures, SBOMs) are kept.
async fn add_to_referrers_tag(
    client: &Client,
    target: &Reference,
    subject: &str,
    entry: ImageIndexEntry,
) -> Result<()> {
    let tag = Reference::with_tag(
        target.registry().into(),
        target.repository().into(),
        subject.replace(':', "-"),
    );
    let mut index = match client
        .pull_manifest_raw(
            &tag,
            &RegistryAuth::Anonymous,
            &[OCI_IMAGE_INDEX_MEDIA_TYPE],
        )
        .await
    {
        Ok((bytes, _)) => serde_json::from_slice(&bytes).unwrap_or_else(|_| empty_index()),
        Err(_) => empty_index(),
    };
    index.manifests.retain(|m| m.digest != entry.digest);
    index.manifests.push(entry);
    push_manifest(client, &tag, &index, OCI_IMAGE_INDEX_MEDIA_TYPE).await?;
    Ok(())
}

fn empty_index() -> OciImageIndex {
    OciImageIndex {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
        manifests: Vec::new(),
        artifact_type: None,
        annotations: None,
    }
}

async fn fetch(client: Client, auth: &RegistryAuth, source: &Reference) -> Result<Pulled> {
    let wasm = WasmClient::new(client);
    // Checks the Wasm OCI layout: one application/wasm layer, a Wasm config.
    let (manifest, _config, digest) = wasm.pull_manifest_and_config(source, auth).await?;
    if let Some(wanted) = source.digest()
        && wanted != digest
    {
        bail!("the registry answered with manifest {digest}, not {wanted}");
    }
    let pinned = source.clone_with_digest(digest.clone());
    let Some(bundle_digest) = manifest
        .annotations
        .as_ref()
        .and_then(|a| a.get(BUNDLE_DIGEST_ANNOTATION))
    else {
        bail!(
            "a Wasm component without a signed pt-host bundle attached; pt-host runs registry plugins only as signed bundles (`pt-host plugin publish`)"
        );
    };
    let referrers = wasm
        .pull_referrers(&pinned, Some(BUNDLE_ARTIFACT_TYPE))
        .await?;
    let mut layer = None;
    for entry in &referrers.manifests {
        let (bytes, _) = wasm
            .pull_manifest_raw(
                &pinned.clone_with_digest(entry.digest.clone()),
                auth,
                &[OCI_IMAGE_MEDIA_TYPE],
            )
            .await?;
        let referrer: OciImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("referrer {} is not an image manifest", entry.digest))?;
        if let [only] = referrer.layers.as_slice()
            && only.digest == *bundle_digest
        {
            layer = Some(only.clone());
            break;
        }
    }
    let Some(layer) = layer else {
        bail!(
            "the signed bundle {bundle_digest} announced by {digest} is not attached (no referrer of type {BUNDLE_ARTIFACT_TYPE} carries it)"
        );
    };
    let mut bytes = Vec::new();
    wasm.pull_blob(&pinned, &layer, &mut bytes).await?;
    if sha256_digest(&bytes) != *bundle_digest {
        bail!("the bundle blob does not match its digest {bundle_digest}");
    }
    let name = pinned_name(source, &digest);
    let bundle = Bundle::from_bytes(&bytes, &name)?;
    let component = sha256_digest(bundle.component());
    if component != manifest.layers[0].digest {
        bail!(
            "the bundle's component ({component}) is not the published Wasm layer ({}); refusing a mismatched artifact",
            manifest.layers[0].digest
        );
    }
    Ok(Pulled {
        bundle,
        pinned: name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_registry_references_from_paths_and_names() {
        for reference in [
            "oci://registry/x",
            "ghcr.io/org/medical_clean:1.0.0",
            "localhost:5000/plugins/x@sha256:00",
            "localhost/x",
        ] {
            assert!(looks_like_reference(reference), "{reference}");
        }
        for other in [
            "medical_clean",
            "medical_clean@0.1.0",
            "plugins/x.wasm",
            "./x.ptplugin",
            "../a/b",
            "dist/x.ptplugin",
            "target/wasm32-wasip2/release/x",
        ] {
            assert!(!looks_like_reference(other), "{other}");
        }
    }

    #[test]
    fn defaults_the_tag_only_when_none_is_given() {
        assert!(!has_tag_or_digest("localhost:5000/plugins/x"));
        assert!(has_tag_or_digest("localhost:5000/plugins/x:1.0"));
        assert!(has_tag_or_digest("ghcr.io/org/x@sha256:ab"));
    }

    #[test]
    fn reads_docker_login_credentials() {
        let dir = tempfile::tempdir().unwrap();
        // "alice:s3cret" in base64, as `docker login` stores it.
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"auths":{"https://registry.example.com":{"auth":"YWxpY2U6czNjcmV0"}}}"#,
        )
        .unwrap();
        // SAFETY: this is the only test in this crate that touches the environment.
        unsafe { std::env::set_var("DOCKER_CONFIG", dir.path()) };
        let found = credentials("registry.example.com").unwrap();
        let other = credentials("ghcr.io").unwrap();
        unsafe { std::env::remove_var("DOCKER_CONFIG") };
        assert!(
            matches!(found, RegistryAuth::Basic(ref u, ref p) if u == "alice" && p == "s3cret")
        );
        assert!(matches!(other, RegistryAuth::Anonymous));
    }
}
