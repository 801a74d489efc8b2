//! A hub on loopback that answers as the Hugging Face Hub and ModelScope do
//! (file lists with sizes and sha256, file downloads with HTTP ranges), and
//! misbehaves on request: a connection dropped halfway through a file, or
//! content that does not match the listed sha256.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
pub struct State {
    /// Repository id → file path → contents.
    pub repos: HashMap<String, HashMap<String, Vec<u8>>>,
    /// Files whose next download stops halfway (then the flag is cleared).
    pub drop_once: HashSet<String>,
    /// Files served with a flipped byte (the listing keeps the true sha256).
    pub corrupt: HashSet<String>,
    /// Every request: target and `Range` header.
    pub requests: Vec<(String, Option<String>)>,
}

pub struct FakeHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl FakeHub {
    /// Serves `repo_id` with the files of `dir`.
    pub fn start(repo_id: &str, dir: &std::path::Path) -> Self {
        let files = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                (
                    p.file_name().unwrap().to_str().unwrap().to_string(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        let state = Arc::new(Mutex::new(State::default()));
        state
            .lock()
            .unwrap()
            .repos
            .insert(repo_id.to_string(), files);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Self { url, state }
    }

    /// Requests for file contents (not listings) so far.
    pub fn downloads(&self) -> Vec<(String, Option<String>)> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(target, _)| target.contains("/resolve/") || target.contains("FilePath="))
            .cloned()
            .collect()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_string());
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    state
        .lock()
        .unwrap()
        .requests
        .push((target.clone(), range.clone()));
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    let mut stream = stream;
    let guard = state.lock().unwrap();
    // HF: /api/models/ORG/NAME/revision/REV, /ORG/NAME/resolve/COMMIT/FILE
    // ModelScope: /api/v1/models/ORG/NAME/repo/files, /api/v1/models/ORG/NAME/repo?FilePath=
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let answer = match parts.as_slice() {
        ["api", "models", org, name, "revision", _] => guard
            .repos
            .get(&format!("{org}/{name}"))
            .map(|files| Answer::Json(hf_listing(files))),
        ["api", "v1", "models", org, name, "repo", "files"] => guard
            .repos
            .get(&format!("{org}/{name}"))
            .map(|files| Answer::Json(modelscope_listing(files))),
        ["api", "v1", "models", org, name, "repo"] => {
            let file = param("FilePath").unwrap_or_default();
            guard
                .repos
                .get(&format!("{org}/{name}"))
                .and_then(|files| files.get(&file))
                .map(|bytes| Answer::File(file, bytes.clone()))
        }
        [org, name, "resolve", _, file] => guard
            .repos
            .get(&format!("{org}/{name}"))
            .and_then(|files| files.get(*file))
            .map(|bytes| Answer::File(file.to_string(), bytes.clone())),
        _ => None,
    };
    drop(guard);
    match answer {
        None => {
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        Some(Answer::Json(json)) => {
            let body = json.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Some(Answer::File(name, mut bytes)) => {
            let mut state = state.lock().unwrap();
            if state.corrupt.contains(&name) {
                bytes[0] ^= 0xff;
            }
            let drop_now = state.drop_once.remove(&name);
            drop(state);
            let start: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse().ok())
                .unwrap_or(0);
            let body = &bytes[start.min(bytes.len())..];
            let status = if start > 0 {
                format!(
                    "206 Partial Content\r\nContent-Range: bytes {start}-{}/{}",
                    bytes.len() - 1,
                    bytes.len()
                )
            } else {
                "200 OK".to_string()
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let sent = if drop_now { body.len() / 2 } else { body.len() };
            let _ = stream.write_all(&body[..sent]);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

enum Answer {
    Json(serde_json::Value),
    File(String, Vec<u8>),
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// As the HF Hub's `?blobs=true`: safetensors files are LFS with a sha256.
fn hf_listing(files: &HashMap<String, Vec<u8>>) -> serde_json::Value {
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, bytes)| {
            if name.ends_with(".safetensors") {
                serde_json::json!({"rfilename": name, "size": bytes.len(),
                    "lfs": {"sha256": sha256(bytes), "size": bytes.len()}})
            } else {
                serde_json::json!({"rfilename": name, "size": bytes.len()})
            }
        })
        .collect();
    serde_json::json!({"id": "fake", "sha": COMMIT, "siblings": siblings})
}

fn modelscope_listing(files: &HashMap<String, Vec<u8>>) -> serde_json::Value {
    let files: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, bytes)| {
            serde_json::json!({"Path": name, "Name": name, "Size": bytes.len(),
                "Sha256": sha256(bytes), "Type": "blob"})
        })
        .collect();
    serde_json::json!({"Code": 200, "Success": true, "Data": {"Files": files}})
}
