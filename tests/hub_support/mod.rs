//! A fake Hugging Face hub on 127.0.0.1 for the hub tests: the listing API, `resolve` (LFS files
//! answered with a 302 to a `/cdn/<sha256>` URL carrying `X-Linked-Etag`/`X-Linked-Size`, as the
//! real hub does), ranges, `X-Error-Code`, gated repositories, and two faults: a connection
//! dropped in the middle of a body, and corrupted bytes.
//!
//! One thread, one connection at a time, `Connection: close` on every answer; the thread stops
//! when the `FakeHub` is dropped, and by itself after two minutes in any case.
#![allow(dead_code)]
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub type Files = BTreeMap<String, Vec<u8>>;

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fake 40-hex commit id.
pub fn commit_id(n: u8) -> String {
    format!("{n:02x}").repeat(20)
}

/// Files stored with Git LFS on the real hub (their etag is the sha256).
pub fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin")
}

/// The etag the hub gives a file: the sha256 for LFS files, a 40-hex "git" id otherwise.
pub fn etag_of(name: &str, bytes: &[u8]) -> String {
    let sha = sha256_hex(bytes);
    if is_lfs(name) {
        sha
    } else {
        sha[..40].to_string()
    }
}

/// The regular files directly in `dir`.
pub fn dir_files(dir: &Path) -> Files {
    let mut out = Files::new();
    for entry in std::fs::read_dir(dir).expect("fixture dir") {
        let entry = entry.expect("dir entry");
        if entry.path().is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            out.insert(name, std::fs::read(entry.path()).expect("fixture file"));
        }
    }
    out
}

#[derive(Clone, Debug)]
pub struct FakeRepo {
    /// "models" or "datasets"
    pub kind: &'static str,
    pub id: String,
    /// branch or tag -> commit
    pub refs: BTreeMap<String, String>,
    pub commits: BTreeMap<String, Files>,
    /// Gated: every request must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The status refused requests get (401 or 403).
    pub deny_status: u16,
}

impl FakeRepo {
    pub fn model(id: &str) -> Self {
        Self::new("models", id)
    }
    pub fn dataset(id: &str) -> Self {
        Self::new("datasets", id)
    }
    fn new(kind: &'static str, id: &str) -> Self {
        FakeRepo {
            kind,
            id: id.to_string(),
            refs: BTreeMap::new(),
            commits: BTreeMap::new(),
            token: None,
            deny_status: 401,
        }
    }
    /// Add a commit and point `branch` at it.
    pub fn with_commit(mut self, branch: &str, commit: &str, files: Files) -> Self {
        self.commits.insert(commit.to_string(), files);
        self.refs.insert(branch.to_string(), commit.to_string());
        self
    }
    pub fn with_ref(mut self, name: &str, commit: &str) -> Self {
        self.refs.insert(name.to_string(), commit.to_string());
        self
    }
    pub fn gated(mut self, token: &str, status: u16) -> Self {
        self.token = Some(token.to_string());
        self.deny_status = status;
        self
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

struct State {
    repos: Vec<FakeRepo>,
    /// File names whose next body request is cut in the middle.
    interrupt_once: HashSet<String>,
    /// File names served with one byte changed.
    corrupt: HashSet<String>,
    log: Vec<Request>,
}

pub struct FakeHub {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FakeHub {
    pub fn start(repos: Vec<FakeRepo>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{addr}");
        let state = Arc::new(Mutex::new(State {
            repos,
            interrupt_once: HashSet::new(),
            corrupt: HashSet::new(),
            log: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, base) = (state.clone(), stop.clone(), url.clone());
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !sp.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                        let _ = serve(stream, &st, &base);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeHub {
            url,
            state,
            stop,
            handle: Some(handle),
        }
    }

    pub fn log(&self) -> Vec<Request> {
        self.state.lock().expect("state").log.clone()
    }
    pub fn clear_log(&self) {
        self.state.lock().expect("state").log.clear();
    }
    pub fn interrupt_once(&self, file: &str) {
        self.state
            .lock()
            .expect("state")
            .interrupt_once
            .insert(file.to_string());
    }
    pub fn set_corrupt(&self, file: &str, on: bool) {
        let mut s = self.state.lock().expect("state");
        if on {
            s.corrupt.insert(file.to_string());
        } else {
            s.corrupt.remove(file);
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then drop the connection.
    cut_at: Option<usize>,
}

impl Answer {
    fn new(status: u16) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
        }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn error(status: u16, code: &str, msg: &str) -> Self {
        let mut a = Answer::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", msg)
            .header("Content-Type", "application/json");
        a.body = format!("{{\"error\":\"{msg}\"}}").into_bytes();
        a
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.by_ref().take(8192).read_line(&mut first)?;
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let (mut range, mut auth) = (None, None);
    for _ in 0..100 {
        let mut line = String::new();
        if reader.by_ref().take(8192).read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let answer = {
        let mut s = state.lock().expect("state");
        s.log.push(Request {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            auth: auth.clone(),
        });
        route(&mut s, &path, range.as_deref(), auth.as_deref(), base)
    };
    write_answer(stream, answer)
}

fn write_answer(mut stream: TcpStream, a: Answer) -> std::io::Result<()> {
    let reason = match a.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", a.status);
    for (k, v) in &a.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        a.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    let n = a.cut_at.unwrap_or(a.body.len()).min(a.body.len());
    stream.write_all(&a.body[..n])?;
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

fn find_repo<'a>(s: &'a State, kind: &str, id: &str) -> Option<&'a FakeRepo> {
    s.repos.iter().find(|r| r.kind == kind && r.id == id)
}

fn denied(repo: &FakeRepo, auth: Option<&str>) -> Option<Answer> {
    let token = repo.token.as_ref()?;
    if auth == Some(format!("Bearer {token}").as_str()) {
        return None;
    }
    Some(Answer::error(
        repo.deny_status,
        "GatedRepo",
        "Access to this repository is restricted",
    ))
}

fn commit_of(repo: &FakeRepo, rev: &str) -> Option<String> {
    repo.refs
        .get(rev)
        .cloned()
        .or_else(|| repo.commits.contains_key(rev).then(|| rev.to_string()))
}

fn route(s: &mut State, path: &str, range: Option<&str>, auth: Option<&str>, base: &str) -> Answer {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/{models|datasets}/{org}/{name}/revision/{rev}
    if segs.first() == Some(&"api") {
        if segs.len() != 6 || segs[4] != "revision" {
            return Answer::error(404, "", "bad api path");
        }
        let id = format!("{}/{}", segs[2], segs[3]);
        let Some(repo) = find_repo(s, segs[1], &id) else {
            return Answer::error(404, "RepoNotFound", "Repository not found");
        };
        if let Some(a) = denied(repo, auth) {
            return a;
        }
        let rev = url_decode(segs[5]);
        let Some(commit) = commit_of(repo, &rev) else {
            return Answer::error(404, "RevisionNotFound", "Invalid rev id");
        };
        let siblings: Vec<serde_json::Value> = repo.commits[&commit]
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let mut a = Answer::new(200).header("Content-Type", "application/json");
        a.body = serde_json::to_vec(&serde_json::json!({
            "id": id, "sha": commit, "siblings": siblings
        }))
        .expect("json");
        return a;
    }
    // /cdn/{sha256}
    if segs.first() == Some(&"cdn") && segs.len() == 2 {
        let found = s.repos.iter().find_map(|r| {
            r.commits.values().find_map(|files| {
                files
                    .iter()
                    .find(|(n, b)| is_lfs(n) && sha256_hex(b) == segs[1])
                    .map(|(n, b)| (n.clone(), b.clone()))
            })
        });
        return match found {
            Some((name, bytes)) => bytes_answer(s, &name, bytes, range, Vec::new()),
            None => Answer::error(404, "", "no such object"),
        };
    }
    // /[datasets/]{org}/{name}/resolve/{rev}/{path...}
    let (kind, segs) = if segs.first() == Some(&"datasets") {
        ("datasets", &segs[1..])
    } else {
        ("models", &segs[..])
    };
    if segs.len() < 5 || segs[2] != "resolve" {
        return Answer::error(404, "", "bad path");
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let Some(repo) = find_repo(s, kind, &id) else {
        return Answer::error(404, "RepoNotFound", "Repository not found");
    };
    if let Some(a) = denied(repo, auth) {
        return a;
    }
    let rev = url_decode(segs[3]);
    let Some(commit) = commit_of(repo, &rev) else {
        return Answer::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let file = url_decode(&segs[4..].join("/"));
    let Some(bytes) = repo.commits[&commit].get(&file).cloned() else {
        return Answer::error(404, "EntryNotFound", "Entry not found");
    };
    let etag = etag_of(&file, &bytes);
    if is_lfs(&file) {
        return Answer::new(302)
            .header("Location", format!("{base}/cdn/{etag}"))
            .header("ETag", format!("\"{}\"", &etag[..40]))
            .header("X-Linked-Etag", format!("\"{etag}\""))
            .header("X-Linked-Size", bytes.len().to_string())
            .header("X-Repo-Commit", commit);
    }
    let extra = vec![
        ("ETag".to_string(), format!("\"{etag}\"")),
        ("X-Repo-Commit".to_string(), commit),
    ];
    bytes_answer(s, &file, bytes, range, extra)
}

/// The bytes of a file, honouring `Range` and the fault settings.
fn bytes_answer(
    s: &mut State,
    name: &str,
    mut bytes: Vec<u8>,
    range: Option<&str>,
    extra: Vec<(String, String)>,
) -> Answer {
    if s.corrupt.contains(name) && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let len = bytes.len();
    let mut a = Answer::new(200);
    a.headers = extra.clone();
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a0, b0) = r.split_once('-').unwrap_or((r, ""));
            let start: usize = a0.parse().unwrap_or(0);
            let end: usize = b0.parse().map(|e: usize| e + 1).unwrap_or(len).min(len);
            if start >= len {
                let mut a = Answer::new(416);
                a.headers = extra;
                a.headers
                    .push(("Content-Range".into(), format!("bytes */{len}")));
                return a;
            }
            a.status = 206;
            a.headers.push((
                "Content-Range".into(),
                format!("bytes {start}-{}/{len}", end - 1),
            ));
            (start, end)
        }
        None => (0, len),
    };
    a.body = bytes[start..end].to_vec();
    let is_probe = range == Some("bytes=0-0");
    if !is_probe && s.interrupt_once.remove(name) {
        a.cut_at = Some(a.body.len() / 2);
    }
    a
}
