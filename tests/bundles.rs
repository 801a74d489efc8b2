//! Signed plugin bundles through the command line: pack, sign, verify,
//! install, run, and every kind of tampering refused with a message that
//! says what was wrong. (A module of the `plugins` test crate.)

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{PtHost, arg as s, assert_ok, component, fixture_model, repo, stderr};

/// `pt-host ARGS`, trusting no keys and using no plugin store from the
/// environment.
pub(crate) fn pt_host<S: AsRef<OsStr>>(args: &[S]) -> Output {
    PtHost::new(args)
        .env_remove("PT_TRUSTED_KEYS")
        .env_remove("PT_PLUGIN_STORE")
        .output()
}

/// A key pair `alice` (trusted) and `mallory` (not), and medical_clean
/// packed and signed by alice.
pub(crate) struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    pub(crate) fn new() -> Self {
        let setup = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        for name in ["alice", "mallory"] {
            assert_ok(&pt_host(&[
                "plugin",
                "keygen",
                "--name",
                name,
                "--output_dir",
                s(&setup.path("keys")),
            ]));
        }
        fs::create_dir_all(setup.path("trusted")).unwrap();
        fs::copy(
            setup.path("keys/alice.pub"),
            setup.path("trusted/alice.pub"),
        )
        .unwrap();
        setup.pack("dist");
        setup
    }

    /// medical_clean packed into `output_dir`, signed by alice.
    pub(crate) fn pack(&self, output_dir: &str) {
        self.pack_plugin("medical_clean", "plugins/medical_clean", output_dir);
    }

    /// The component `name` with the sources in `plugin_dir`, packed into
    /// `output_dir` and signed by alice.
    pub(crate) fn pack_plugin(&self, name: &str, plugin_dir: &str, output_dir: &str) {
        self.pack_plugin_from(&component(name), &repo().join(plugin_dir), output_dir);
    }

    pub(crate) fn pack_plugin_from(&self, component: &Path, plugin_dir: &Path, output_dir: &str) {
        assert_ok(&pt_host(&[
            "plugin",
            "pack",
            "--component",
            s(component),
            "--plugin_dir",
            s(plugin_dir),
            "--output_dir",
            s(&self.path(output_dir)),
            "--key",
            s(&self.path("keys/alice.key")),
        ]));
    }

    /// A copy of the bundle re-signed by mallory, whom nobody trusts.
    pub(crate) fn signed_by_mallory(&self) -> PathBuf {
        let mallory = self.path("dist/mallory.ptplugin");
        fs::copy(self.bundle(), &mallory).unwrap();
        assert_ok(&pt_host(&[
            "plugin",
            "sign",
            s(&mallory),
            "--key",
            s(&self.path("keys/mallory.key")),
        ]));
        mallory
    }

    pub(crate) fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub(crate) fn bundle(&self) -> PathBuf {
        self.path("dist/medical_clean-0.1.0.ptplugin")
    }

    pub(crate) fn dirs(&self) -> Vec<String> {
        vec![
            "--trusted_keys".into(),
            s(&self.path("trusted")).into(),
            "--plugin_store".into(),
            s(&self.path("store")).into(),
        ]
    }

    fn plugin(&self, command: &str, target: &Path) -> Output {
        let mut args: Vec<String> = vec!["plugin".into(), command.into(), s(target).into()];
        args.extend(self.dirs());
        pt_host(&args)
    }

    /// `pt-host prepare` of the fixture's train.txt with `--plugin plugin`.
    pub(crate) fn prepare(&self, plugin: &str, out: &str) -> Output {
        let mut args: Vec<String> = [
            "prepare",
            "--model_name_or_path",
            s(&fixture_model()),
            "--train_file_dir",
            s(&repo().join("tests/fixtures/bloom-tiny/train.txt")),
            "--output_dir",
            s(&self.path(out)),
            "--cache_dir",
            s(&self.path("cache")),
            "--disable_tqdm",
            "--plugin",
            plugin,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(self.dirs());
        pt_host(&args)
    }

    /// A copy of the bundle with `from` replaced by `to` (same length) in its bytes.
    fn tampered(&self, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut bytes = fs::read(self.bundle()).unwrap();
        edit(&mut bytes);
        let path = self.path(&format!("dist/{name}.ptplugin"));
        fs::write(&path, bytes).unwrap();
        path
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern in the bundle")
}

#[test]
fn a_signed_bundle_verifies_installs_and_runs_like_its_component() {
    let setup = Setup::new();
    let verify = setup.plugin("verify", &setup.bundle());
    assert_ok(&verify);
    assert!(
        String::from_utf8_lossy(&verify.stdout)
            .contains("OK — medical_clean 0.1.0 for pt:plugin@0.1.0")
    );
    assert_ok(&setup.plugin("test", &setup.bundle()));
    let inspect = pt_host(&["plugin", "inspect", s(&setup.bundle())]);
    assert_ok(&inspect);
    let shown = String::from_utf8_lossy(&inspect.stdout);
    for expected in [
        "\"license\": \"Apache-2.0\"",
        "\"memory_mb\": 64",
        "pt:plugin/mapper@0.1.0",
        "plugin.wasm",
        "wit/plugin.wit",
    ] {
        assert!(shown.contains(expected), "{expected} not in {shown}");
    }
    // Packing is deterministic: the same inputs give the same bytes.
    setup.pack("again");
    let again = setup.path("again");
    assert_eq!(
        fs::read(again.join("medical_clean-0.1.0.ptplugin")).unwrap(),
        fs::read(setup.bundle()).unwrap()
    );

    assert_ok(&setup.plugin("install", &setup.bundle()));
    let list = pt_host(&[vec!["plugin".to_string(), "list".into()], setup.dirs()].concat());
    assert!(String::from_utf8_lossy(&list.stdout).contains("medical_clean@0.1.0"));
    // The same data from the .wasm, the .ptplugin and the installed bundle.
    assert_ok(&setup.prepare(s(&component("medical_clean")), "wasm"));
    assert_ok(&setup.prepare(s(&setup.bundle()), "bundle"));
    assert_ok(&setup.prepare("medical_clean@0.1.0", "installed"));
    let report = |out: &str| {
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(setup.path(out).join("data_report.json")).unwrap())
                .unwrap();
        (json["train"].clone(), json["plugins"][0]["digest"].clone())
    };
    assert_eq!(report("wasm"), report("bundle"));
    assert_eq!(report("wasm"), report("installed"));

    // An installed bundle modified on disk is refused.
    let blobs = setup.path("store/blobs");
    let blob = fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 2000;
    bytes[last] ^= 1;
    fs::write(&blob, bytes).unwrap();
    let modified = setup.prepare("medical_clean@0.1.0", "modified");
    assert!(
        stderr(&modified).contains("was modified on disk; reinstall it"),
        "{}",
        stderr(&modified)
    );
    let removed = pt_host(
        &[
            vec![
                "plugin".to_string(),
                "remove".into(),
                "medical_clean".into(),
            ],
            setup.dirs(),
        ]
        .concat(),
    );
    assert_ok(&removed);
    let gone = setup.prepare("medical_clean@0.1.0", "gone");
    assert!(
        stderr(&gone).contains("plugin medical_clean@0.1.0 is not installed"),
        "{}",
        stderr(&gone)
    );
}

#[test]
fn tampering_and_untrusted_signatures_are_refused() {
    let setup = Setup::new();
    let refused = |path: &Path, expected: &str| {
        for command in ["verify", "install"] {
            let output = setup.plugin(command, path);
            assert!(!output.status.success());
            assert!(
                stderr(&output).contains(expected),
                "{command}: {expected:?} not in {}",
                stderr(&output)
            );
        }
        let run = setup.prepare(s(path), "run");
        assert!(
            stderr(&run).contains(expected),
            "prepare: {expected:?} not in {}",
            stderr(&run)
        );
    };
    // One byte of the component's code.
    let component = setup.tampered("component", |bytes| {
        let at = find(bytes, b"\0asm") + 64;
        bytes[at] ^= 0x01;
    });
    refused(&component, "`plugin.wasm` has sha256:");
    // One byte of the signed manifest (its description).
    let manifest = setup.tampered("manifest", |bytes| {
        let at = find(bytes, b"Normalises");
        bytes[at] = b'n';
    });
    refused(&manifest, "the signature does not match the manifest");
    // Signed by a key nobody trusts.
    let mallory = setup.signed_by_mallory();
    refused(&mallory, "which is not trusted");
    // Alice's signature, but Mallory's public key in the signature file.
    let mallory_pub = fs::read_to_string(setup.path("keys/mallory.pub")).unwrap();
    let alice_pub = fs::read_to_string(setup.path("keys/alice.pub")).unwrap();
    let swapped = setup.tampered("swapped", |bytes| {
        let (alice, mallory) = (
            alice_pub.split_whitespace().nth(1).unwrap(),
            mallory_pub.split_whitespace().nth(1).unwrap(),
        );
        let at = find(bytes, alice.as_bytes());
        bytes[at..at + 64].copy_from_slice(mallory.as_bytes());
    });
    refused(&swapped, "which is not trusted");
    // No trusted keys at all.
    let empty = setup.path("nobody");
    let output = pt_host(&[
        "plugin",
        "verify",
        s(&setup.bundle()),
        "--trusted_keys",
        s(&empty),
    ]);
    assert!(
        stderr(&output).contains("which is not trusted"),
        "{}",
        stderr(&output)
    );
    // Not a bundle.
    let junk = setup.tampered("junk", |bytes| bytes.truncate(100));
    let output = setup.plugin("verify", &junk);
    assert!(!output.status.success());
}

/// A bundle built for an interface this host does not implement is refused
/// with what to rebuild against, even when properly signed.
#[test]
fn an_incompatible_interface_version_is_refused() {
    let setup = Setup::new();
    let original = pt_bundle::Bundle::read(&setup.bundle()).unwrap();
    let mut manifest = original.manifest.clone();
    manifest.interface = "pt:plugin@0.3.0".into();
    let mut future = pt_bundle::Bundle::new(manifest, original.files().clone()).unwrap();
    future.sign(&pt_bundle::read_signing_key(&setup.path("keys/alice.key")).unwrap());
    let path = setup.path("dist/future.ptplugin");
    fs::write(&path, future.to_bytes().unwrap()).unwrap();
    let output = setup.plugin("verify", &path);
    let message = stderr(&output);
    assert!(
        message.contains("built for interface pt:plugin@0.3.0, this pt-host implements pt:plugin@0.1.0, pt:plugin@0.2.0; rebuild the plugin against"),
        "{message}"
    );
}

/// A task plugin's bundle states interface 0.2.0 and carries the WIT it
/// was built against; a plain plugin's stays 0.1.0. Both verify here.
#[test]
fn a_task_plugin_bundle_states_interface_0_2_0() {
    let setup = Setup::new();
    setup.pack_plugin("medqa_tasks", "plugins/medqa_tasks", "tasks");
    for (bundle, interface, tasks_wit) in [
        (
            setup.path("tasks/medqa_tasks-0.1.0.ptplugin"),
            "pt:plugin@0.2.0",
            true,
        ),
        (setup.bundle(), "pt:plugin@0.1.0", false),
    ] {
        let read = pt_bundle::Bundle::read(&bundle).unwrap();
        assert_eq!(read.manifest.interface, interface);
        assert_eq!(read.files().contains_key("wit/tasks.wit"), tasks_wit);
        assert_ok(&setup.plugin("verify", &bundle));
    }
}

/// `plugin test` reports each fixture case that does not hold.
#[test]
fn failing_fixtures_are_reported_by_case() {
    let setup = Setup::new();
    let original = pt_bundle::Bundle::read(&setup.bundle()).unwrap();
    let mut files = original.files().clone();
    files.insert(
        "fixtures/cases.jsonl".into(),
        b"{\"text\": \"\xe4\xbd\xa0\xe5\xa5\xbd\\n\", \"expect\": \"keep\"}\n".to_vec(),
    );
    let mut wrong = pt_bundle::Bundle::new(original.manifest.clone(), files).unwrap();
    wrong.sign(&pt_bundle::read_signing_key(&setup.path("keys/alice.key")).unwrap());
    let path = setup.path("dist/wrong.ptplugin");
    fs::write(&path, wrong.to_bytes().unwrap()).unwrap();
    let output = setup.plugin("test", &path);
    assert!(
        stderr(&output).contains(
            "1 of 1 fixture cases failed:\n  case 1: expected Keep, got Drop(\"too_short\")"
        ),
        "{}",
        stderr(&output)
    );
}

/// The plugins in Python, JavaScript and C pack into bundles whose fixtures pass.
#[test]
fn every_language_plugin_packs_and_passes_its_fixtures() {
    let setup = Setup::new();
    // (component, sources, plugin id)
    for (name, dir, id) in [
        ("zh_normalize", "plugins/zh_normalize_py", "zh_normalize"),
        (
            "markdown_strip",
            "plugins/markdown_strip_js",
            "markdown_strip",
        ),
        (
            "length_filter_c",
            "plugins/length_filter_c",
            "length_filter",
        ),
    ] {
        setup.pack_plugin(name, dir, "langs");
        let bundle = setup.path(&format!("langs/{id}-0.1.0.ptplugin"));
        let tested = setup.plugin("test", &bundle);
        assert_ok(&tested);
        assert!(String::from_utf8_lossy(&tested.stdout).contains("fixture cases passed"));
    }
}

/// `plugin new` gives, in every language, a project whose build script
/// makes a component that packs and passes its own fixtures.
#[test]
fn new_plugin_projects_build_and_pass_their_fixtures() {
    let setup = Setup::new();
    // target/debug/deps/this-test -> target: share the build and the npm tools.
    let target = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .unwrap()
        .to_path_buf();
    for lang in ["rust", "python", "js", "c"] {
        let name = format!("my_{lang}");
        assert_ok(&pt_host(&[
            "plugin",
            "new",
            &name,
            "--lang",
            lang,
            "--output_dir",
            s(&setup.path("projects")),
        ]));
        let project = setup.path(&format!("projects/{name}"));
        let npm_tools = target.join("lang-tools/node_modules");
        if lang == "js" && npm_tools.is_dir() {
            std::os::unix::fs::symlink(&npm_tools, project.join("node_modules")).unwrap();
        }
        let build = Command::new("bash")
            .arg(project.join("build.sh"))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert_ok(&build);
        setup.pack_plugin_from(&project.join(format!("{name}.wasm")), &project, "scaffolds");
        let tested = setup.plugin(
            "test",
            &setup.path(&format!("scaffolds/{name}-0.1.0.ptplugin")),
        );
        assert_ok(&tested);
        assert!(String::from_utf8_lossy(&tested.stdout).contains("3 fixture cases passed"));
    }
    let taken = pt_host(&[
        "plugin",
        "new",
        "my_c",
        "--lang",
        "c",
        "--output_dir",
        s(&setup.path("projects")),
    ]);
    assert!(
        stderr(&taken).contains("exists; choose another name"),
        "{}",
        stderr(&taken)
    );
    let bad = pt_host(&[
        "plugin",
        "new",
        "My-Plugin",
        "--output_dir",
        s(&setup.path("projects")),
    ]);
    assert!(
        stderr(&bad).contains("use lowercase letters, digits and `_`"),
        "{}",
        stderr(&bad)
    );
}

/// The design's `--plugin medical_clean.wasm`, a bare name, works from any
/// directory once scripts/install-plugins.sh (the quick start runs it) has
/// put the example plugins into the local store as signed bundles; a path
/// still wins, and a name found nowhere says how to build or install it.
#[test]
fn a_bare_plugin_name_resolves_to_the_installed_example_plugins() {
    let home = tempfile::tempdir().unwrap();
    let (config, data) = (home.path().join("config"), home.path().join("data"));
    // target/wasm32-wasip2/release/medical_clean.wasm -> target
    let target = component("medical_clean")
        .ancestors()
        .nth(3)
        .unwrap()
        .to_path_buf();
    let script = |args: &[&str]| {
        Command::new("bash")
            .arg(repo().join("scripts/install-plugins.sh"))
            .arg(env!("CARGO_BIN_EXE_pt-host"))
            .args(args)
            .env("XDG_CONFIG_HOME", &config)
            .env("XDG_DATA_HOME", &data)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("PT_TRUSTED_KEYS")
            .env_remove("PT_PLUGIN_STORE")
            .output()
            .unwrap()
    };
    let installed = script(&[]);
    assert_ok(&installed);
    assert!(
        String::from_utf8_lossy(&installed.stdout).contains("installed medical_clean@0.1.0"),
        "{}",
        String::from_utf8_lossy(&installed.stdout)
    );
    // Twice is fine: the same key, the bundles replaced.
    assert_ok(&script(&[]));

    let work = tempfile::tempdir().unwrap();
    fs::write(
        work.path().join("a.txt"),
        "发热是传染病最常见的症状之一，应及时就医。\n",
    )
    .unwrap();
    let prepare = |plugin: &str| {
        Command::new(env!("CARGO_BIN_EXE_pt-host"))
            .current_dir(work.path())
            .args(["prepare", "--model_name_or_path"])
            .arg(fixture_model())
            .args([
                "--train_file_dir",
                "a.txt",
                "--validation_split_percentage",
                "0",
            ])
            .args([
                "--output_dir",
                "out",
                "--cache_dir",
                "cache",
                "--disable_tqdm",
            ])
            .args(["--plugin", plugin])
            .env("XDG_CONFIG_HOME", &config)
            .env("XDG_DATA_HOME", &data)
            .env_remove("PT_TRUSTED_KEYS")
            .env_remove("PT_PLUGIN_STORE")
            .output()
            .unwrap()
    };
    for name in ["medical_clean.wasm", "medical_clean", "medical_clean@0.1.0"] {
        let output = prepare(name);
        assert_ok(&output);
        assert!(
            stderr(&output).contains("plugin medical_clean 0.1.0"),
            "{name}: {}",
            stderr(&output)
        );
    }
    let missing = prepare("no_such_plugin.wasm");
    assert_eq!(missing.status.code(), Some(1));
    let message = stderr(&missing);
    assert!(
        message.contains(
            "--plugin no_such_plugin.wasm: no such file here, and no bundle `no_such_plugin`"
        ) && message.contains("scripts/install-plugins.sh"),
        "{message}"
    );
}
