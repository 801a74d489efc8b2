//! A real OCI registry on loopback: Debian's `docker-registry` (the CNCF
//! distribution reference implementation), with its storage in a temporary
//! directory. Stopped when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LoopbackRegistry {
    /// `127.0.0.1:PORT`, as references name it.
    pub host: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl LoopbackRegistry {
    /// Starts one, or returns `None` (after saying so) where `docker-registry`
    /// is not installed and `PT_REQUIRE_REGISTRY` is unset; `scripts/test.sh`
    /// installs it and sets that, so CI never skips.
    pub fn start(test: &str) -> Option<Self> {
        let binary = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        let Some(binary) = binary else {
            assert!(
                std::env::var_os("PT_REQUIRE_REGISTRY").is_none(),
                "{test}: docker-registry is not installed (apt-get install docker-registry)"
            );
            eprintln!("SKIPPED {test}: docker-registry is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {host}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = Self { host, child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while registry.get("/v2/", "*/*").0 != 200 {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(registry)
    }

    /// `GET path` with `accept`: status and body (0 when not reachable).
    pub fn get(&self, path: &str, accept: &str) -> (u16, Vec<u8>) {
        let Ok(mut stream) = TcpStream::connect(&self.host) else {
            return (0, Vec::new());
        };
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: {accept}\r\n\r\n",
            self.host
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = Vec::new();
        if stream.read_to_end(&mut response).is_err() {
            return (0, Vec::new());
        }
        let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (0, Vec::new());
        };
        let head = String::from_utf8_lossy(&response[..split]);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, response[split + 4..].to_vec())
    }

    /// The file holding blob `sha256:HEX` in the registry's storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
