//! Hugging Face hub access: name models and datasets the way Python does
//! (`meta-llama/Llama-3.2-1B-Instruct`, `hf://datasets/locuslab/TOFU/forget10.json`), find them
//! in the shared cache, and download what is missing.
//!
//! # Specs
//! * a local file or directory (always tried first);
//! * a model id `org/name[@revision]` (also `hf://org/name[@revision]`);
//! * a file in a dataset `hf://datasets/org/name[@revision]/path/in/repo.json` (or a whole
//!   dataset `hf://datasets/org/name[@revision]` for [`fetch`]); `hf://org/name/path` names a
//!   file of a model. A revision containing `/` is written with `%2F` (`@refs%2Fpr%2F1`).
//!
//! Resolution order: local path, then the cache (no network at all when the cached snapshot
//! holds what is needed), then the hub.
//!
//! # Cache
//! Exactly Python `huggingface_hub`'s layout, so either tool reads what the other wrote:
//! `<cache>/models--org--name/{blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>
//! (relative symlink; a copy where symlinks are unavailable), refs/<revision>}` (`datasets--…` for
//! datasets), partial downloads in `blobs/<etag>.incomplete` (Python's name, so a download
//! interrupted in either tool resumes in either) and lock files in `<cache>/.locks/<repo
//! folder>/<etag>.lock` (the same `flock` lock Python's `filelock` takes).
//!
//! # Environment ([`HubSettings::from_env`])
//! `HF_ENDPOINT`, `HF_HOME` (default `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`),
//! `HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`; default `$HF_HOME/hub`), `HF_TOKEN` (or
//! `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH` / `$HF_HOME/token`), `HF_HUB_OFFLINE`
//! (`1`/`true`/`yes`/`on`: no network at all). The token is sent only as an `Authorization:
//! Bearer` header and is never printed, logged or put in an error message.
//!
//! # Design: hf-hub 0.5 for transport, our own code for the protocol
//! hf-hub 0.5 (`api::sync`) cannot meet the requirements on its own:
//! * `ApiRepo::download` renames `blobs/<etag>.part` into place **without checking the size or
//!   the sha256**, so a truncated or corrupted download becomes a blob that looks complete;
//! * it reads neither `HF_TOKEN`, `HF_HUB_CACHE` nor `HF_HUB_OFFLINE`;
//! * its partial files are `.part`, not Python's `.incomplete`, and its lock files sit in
//!   `blobs/`, not `.locks/`;
//! * its cache lookup (`CacheRepo::get`) ignores revisions that are commit hashes, it does not
//!   handle sharded checkpoints, and its metadata call panics (`expect`) on a redirect without
//!   `Location`;
//! * with `ureq` not a direct dependency we cannot build our own HTTP client (no TLS otherwise).
//!
//! So hf-hub provides the HTTP client only: its configured `ureq` agent (rustls, user agent,
//! bearer token, authorization dropped on cross-host redirects such as the LFS CDN, proxies from
//! the environment) reached through the public `ApiRepo::info_request()`, retargeted per request
//! with ureq's `RequestBuilder::uri` and per-request config (`http_status_as_error(false)`,
//! redirects, identity encoding, timeouts, no proxy for loopback endpoints). Everything else is
//! here: spec parsing, settings, the listing (`/api/{models,datasets}/{id}/revision/{rev}`), file
//! selection, the metadata request (`Range: bytes=0-0`, relative redirects followed by hand as
//! Python does, `x-linked-etag`/`x-linked-size` of LFS files), resumable download to
//! `.incomplete` with retries, size and sha256 verification, atomic rename, relative symlinks,
//! refs, offline mode and error messages (401/403 say to set `HF_TOKEN`; 404 names the repo, the
//! revision and the file). Adding `ureq` as a direct dependency would let this module name its
//! types and drop hf-hub; nothing else would change.
//!
//! # Limits
//! * Cache first: when the snapshot `refs/<revision>` points to holds what is needed, the hub is
//!   not asked, so a branch that moved on the hub is noticed only through `@<commit>` or once the
//!   cached snapshot is incomplete. (A whole dataset, `hf://datasets/org/name`, is always listed
//!   when online, since only the hub knows its files.)
//! * Non-LFS files (etag = git blob sha1) are checked by size only; LFS files by size and
//!   sha256. Files already in the cache are trusted, as huggingface_hub trusts them, with one
//!   cheap check: a cached `.safetensors` file must be as long as its header says (a blob cut
//!   short after its download would otherwise pass for the model). A damaged one is downloaded
//!   again; offline it is an error naming it.
use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files of a model repository fetched by default when present (besides the safetensors weights:
/// `model.safetensors`, or `model.safetensors.index.json` and every shard it names, and
/// `adapter_model.safetensors` for PEFT adapters). `*.bin`/`*.pth` only through an include glob.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "adapter_config.json",
];

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Relative redirects followed by hand on a metadata request.
const MAX_RELATIVE_REDIRECTS: usize = 10;
/// How long to wait for another process downloading the same blob.
const LOCK_WAIT: Duration = Duration::from_secs(600);
/// Largest JSON answer (repository listing) read into memory.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// Where and how to reach the hub. Tests build one by hand; the CLI uses [`HubSettings::from_env`].
#[derive(Clone)]
pub struct HubSettings {
    /// Base URL, without a trailing `/` (`https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Access token for gated/private repositories. Never printed.
    pub token: Option<String>,
    /// No network at all: only the cache.
    pub offline: bool,
    /// Show a progress bar per downloaded file on stderr (indicatif hides it when stderr is not
    /// a terminal).
    pub progress: bool,
    /// Resumed retries of a download after a transport error.
    pub max_retries: u32,
}

impl fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

impl HubSettings {
    /// Settings for `endpoint` and `cache_dir`: no token, online, no progress bars, 3 retries.
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        HubSettings {
            endpoint: normalize_endpoint(&endpoint.into()),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            progress: false,
            max_retries: 3,
        }
    }

    /// Settings from the process environment (see the module documentation).
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Settings from an environment given as a lookup function (`from_env` passes
    /// `std::env::var`). Empty values count as unset. Reads the token file when no token
    /// variable is set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let home = get("HOME").or_else(|| get("USERPROFILE"));
        let expand = |v: String| -> PathBuf {
            match (v.strip_prefix("~/").or(v.strip_prefix("~\\")), &home) {
                (Some(rest), Some(h)) => Path::new(h).join(rest),
                _ if v == "~" => home.clone().map(PathBuf::from).unwrap_or_else(|| v.into()),
                _ => PathBuf::from(v),
            }
        };
        let hf_home = match get("HF_HOME") {
            Some(h) => expand(h),
            None => {
                let cache_root = match get("XDG_CACHE_HOME") {
                    Some(x) => expand(x),
                    None => match &home {
                        Some(h) => Path::new(h).join(".cache"),
                        None => PathBuf::from(".cache"),
                    },
                };
                cache_root.join("huggingface")
            }
        };
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = normalize_endpoint(&get("HF_ENDPOINT").unwrap_or_default());
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let offline = get("HF_HUB_OFFLINE").is_some_and(|v| parse_bool(&v));
        HubSettings {
            endpoint,
            cache_dir,
            token,
            offline,
            progress: true,
            max_retries: 3,
        }
    }
}

fn normalize_endpoint(e: &str) -> String {
    let e = e.trim().trim_end_matches('/');
    if e.is_empty() {
        DEFAULT_ENDPOINT.to_string()
    } else {
        e.to_string()
    }
}

fn parse_bool(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

// ---------------------------------------------------------------------------------------------
// Specs
// ---------------------------------------------------------------------------------------------

/// The kind of a hub repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn word(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// A repository (and possibly one file in it) on the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub kind: RepoKind,
    /// `org/name`
    pub repo_id: String,
    /// From `@revision`; `None` means `main`.
    pub revision: Option<String>,
    /// A file inside the repository (`hf://…/path`).
    pub path: Option<String>,
}

/// What a command-line spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Local(PathBuf),
    Hub(HubRef),
}

/// Parse a spec: an existing local path wins; otherwise a hub id or `hf://` URL.
pub fn parse_spec(spec: &str) -> Result<Spec> {
    if !spec.starts_with("hf://") && Path::new(spec).exists() {
        return Ok(Spec::Local(PathBuf::from(spec)));
    }
    parse_hub_spec(spec).map(Spec::Hub)
}

/// Parse `org/name[@rev]`, `hf://[models/]org/name[@rev][/path]` or
/// `hf://datasets/org/name[@rev][/path]` without looking at the file system.
pub fn parse_hub_spec(spec: &str) -> Result<HubRef> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "'{spec}' is not a local path, a hub id (org/name[@revision]) or a hub URL \
             (hf://datasets/org/name[@revision]/path): {why}"
        ))
    };
    let (kind, rest, url) = if let Some(rest) = spec.strip_prefix("hf://") {
        if let Some(r) = rest.strip_prefix("datasets/") {
            (RepoKind::Dataset, r, true)
        } else if let Some(r) = rest.strip_prefix("models/") {
            (RepoKind::Model, r, true)
        } else if rest.starts_with("spaces/") {
            return Err(bad("spaces are not supported"));
        } else {
            (RepoKind::Model, rest, true)
        }
    } else {
        (RepoKind::Model, spec, false)
    };
    let mut parts = rest.splitn(3, '/');
    let org = parts.next().unwrap_or("");
    let name_rev = parts.next().ok_or_else(|| bad("expected org/name"))?;
    let path = parts.next();
    if path.is_some() && !url {
        return Err(bad("no such local file or directory"));
    }
    let (name, revision) = match name_rev.split_once('@') {
        Some((n, r)) => {
            let r = r.replace("%2F", "/").replace("%2f", "/");
            if let Err(why) = check_revision(&r) {
                return Err(bad(&why));
            }
            (n, Some(r))
        }
        None => (name_rev, None),
    };
    let repo_id = format!("{org}/{name}");
    check_repo_id(&repo_id).map_err(|why| bad(&why))?;
    let path = match path {
        Some(p) => {
            let p = p.trim_end_matches('/');
            if p.is_empty() {
                None
            } else {
                check_rel_path(p).map_err(|why| bad(&why))?;
                Some(p.to_string())
            }
        }
        None => None,
    };
    Ok(HubRef {
        kind,
        repo_id,
        revision,
        path,
    })
}

fn check_repo_id(id: &str) -> std::result::Result<(), String> {
    if id.len() > 96 {
        return Err("a repo id has at most 96 characters".into());
    }
    for part in id.split('/') {
        let ok_chars = part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if part.is_empty()
            || !ok_chars
            || part.starts_with(['-', '.'])
            || part.ends_with(['-', '.'])
            || part.contains("--")
            || part.contains("..")
        {
            return Err(format!(
                "'{part}' is not a valid repo name (letters, digits, '-', '_', '.')"
            ));
        }
    }
    Ok(())
}

fn check_revision(rev: &str) -> std::result::Result<(), String> {
    check_rel_path(rev).map_err(|e| format!("invalid revision '{rev}': {e}"))
}

/// A relative path inside a repository (or a revision, which becomes a path under `refs/`):
/// no absolute paths, `..`, `.`, empty components, backslashes or control characters.
fn check_rel_path(p: &str) -> std::result::Result<(), String> {
    if p.is_empty() || p.len() > 1024 {
        return Err("empty or too long".into());
    }
    if p.contains('\\') || p.chars().any(|c| c.is_control()) {
        return Err(format!("'{p}' contains a backslash or a control character"));
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("'{p}' is not a plain relative path"));
    }
    if p.contains(':') && cfg!(windows) {
        return Err(format!("'{p}' contains ':'"));
    }
    Ok(())
}

/// A name used as a single file name in the cache (commit hash, etag).
fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The sha256 an etag stands for: the etag of an LFS file is the hex sha256 of its content.
fn lfs_sha256(etag: &str) -> Option<String> {
    (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| etag.to_ascii_lowercase())
}

fn normalize_etag(e: &str) -> String {
    let e = e.trim();
    let e = e.strip_prefix("W/").unwrap_or(e);
    e.trim_matches('"').to_string()
}

/// `fnmatch`-style match as in `huggingface_hub` (`*` also matches `/`, `?` one character; a
/// pattern ending in `/` matches everything below that folder).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let pattern = if pattern.ends_with('/') {
        format!("{pattern}*")
    } else {
        pattern.to_string()
    };
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

// ---------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------

/// A model directory (config.json + safetensors + tokenizer files) for `spec`, a local path or a
/// hub id `org/name[@revision]`, using [`HubSettings::from_env`].
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_with(&HubSettings::from_env(), spec)
}

/// [`resolve_model`] with explicit settings.
pub fn resolve_model_with(settings: &HubSettings, spec: &str) -> Result<PathBuf> {
    if let Spec::Hub(r) = parse_spec(spec)? {
        if r.kind == RepoKind::Dataset {
            return Err(Error::InvalidArgument(format!(
                "'{spec}' names a dataset, not a model"
            )));
        }
        if r.path.is_some() {
            return Err(Error::InvalidArgument(format!(
                "'{spec}' names a file; a model is a repository (org/name[@revision])"
            )));
        }
    }
    fetch_with(settings, spec, None, &[])
}

/// A data file for `spec`: a local file, or `hf://datasets/org/name[@revision]/path/in/repo`,
/// using [`HubSettings::from_env`].
pub fn resolve_file(spec: &str) -> Result<PathBuf> {
    resolve_file_with(&HubSettings::from_env(), spec)
}

/// [`resolve_file`] with explicit settings.
pub fn resolve_file_with(settings: &HubSettings, spec: &str) -> Result<PathBuf> {
    if !spec.starts_with("hf://") {
        let p = PathBuf::from(spec);
        return match std::fs::metadata(&p) {
            Ok(_) => Ok(p),
            Err(e) => Err(Error::io(p, e)),
        };
    }
    let r = parse_hub_spec(spec)?;
    if r.path.is_none() {
        return Err(Error::InvalidArgument(format!(
            "'{spec}' names a repository; name a file in it: \
             hf://datasets/org/name[@revision]/path/in/repo.json"
        )));
    }
    fetch_with(settings, spec, None, &[])
}

/// Make `spec` available locally and return its path: a local path as is; for a model repo the
/// snapshot directory; for a dataset repo the snapshot directory (the files matching `include`,
/// or every file when `include` is empty); for `hf://…/path` the file. `revision` overrides
/// `main` (it must agree with an `@revision` in the spec). `include` globs add files to a
/// model's default set (e.g. `*.bin`). Uses [`HubSettings::from_env`].
pub fn fetch(spec: &str, revision: Option<&str>, include: &[String]) -> Result<PathBuf> {
    fetch_with(&HubSettings::from_env(), spec, revision, include)
}

/// [`fetch`] with explicit settings.
pub fn fetch_with(
    settings: &HubSettings,
    spec: &str,
    revision: Option<&str>,
    include: &[String],
) -> Result<PathBuf> {
    let r = match parse_spec(spec)? {
        Spec::Local(p) => {
            if revision.is_some() || !include.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "'{spec}' is a local path: --revision and --include apply to hub repositories"
                )));
            }
            return Ok(p);
        }
        Spec::Hub(r) => r,
    };
    let rev = match (&r.revision, revision) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::InvalidArgument(format!(
                "'{spec}' names revision '{a}' but --revision is '{b}'"
            )))
        }
        (Some(a), _) => a.clone(),
        (None, Some(b)) => {
            check_revision(b).map_err(Error::InvalidArgument)?;
            b.to_string()
        }
        (None, None) => "main".to_string(),
    };
    for g in include {
        if g.is_empty() {
            return Err(Error::InvalidArgument("an empty --include glob".into()));
        }
    }
    let mut repo = RepoCache::new(settings, r.kind, &r.repo_id, &rev);
    repo.bare = !spec.starts_with("hf://");
    match &r.path {
        Some(path) => {
            if !include.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "'{spec}' names one file: --include applies to repositories"
                )));
            }
            fetch_one_file(settings, &repo, path)
        }
        None => fetch_snapshot(settings, &repo, include),
    }
}

// ---------------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------------

/// One repository at one revision in the cache.
struct RepoCache<'a> {
    settings: &'a HubSettings,
    kind: RepoKind,
    repo_id: String,
    revision: String,
    /// `<cache>/models--org--name`
    dir: PathBuf,
    /// The spec was a bare `org/name`, which may have been meant as a local path.
    bare: bool,
}

impl<'a> RepoCache<'a> {
    fn new(settings: &'a HubSettings, kind: RepoKind, repo_id: &str, revision: &str) -> Self {
        let rtype = match kind {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        };
        let folder = hf_hub::Repo::new(repo_id.to_string(), rtype).folder_name();
        RepoCache {
            settings,
            kind,
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            dir: settings.cache_dir.join(folder),
            bare: false,
        }
    }

    /// Appended to "not found" messages of bare ids.
    fn local_hint(&self) -> String {
        if self.bare {
            format!(
                " (and there is no local file or directory '{}')",
                self.repo_id
            )
        } else {
            String::new()
        }
    }

    /// The spec that fetches `path` (or the repository) at this revision.
    fn fetch_spec(&self, path: Option<&str>) -> String {
        let rev = if self.revision == "main" {
            String::new()
        } else {
            format!("@{}", self.revision.replace('/', "%2F"))
        };
        match (self.kind, path) {
            (RepoKind::Model, None) => format!("{}{rev}", self.repo_id),
            (RepoKind::Model, Some(p)) => format!("hf://{}{rev}/{p}", self.repo_id),
            (RepoKind::Dataset, None) => format!("hf://datasets/{}{rev}", self.repo_id),
            (RepoKind::Dataset, Some(p)) => format!("hf://datasets/{}{rev}/{p}", self.repo_id),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} {} (revision '{}')",
            self.kind.word(),
            self.repo_id,
            self.revision
        )
    }

    fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    fn ref_path(&self) -> PathBuf {
        let mut p = self.dir.join("refs");
        for c in self.revision.split('/') {
            p.push(c);
        }
        p
    }

    fn lock_path(&self, etag: &str) -> PathBuf {
        let folder = self.dir.file_name().map(PathBuf::from).unwrap_or_default();
        self.settings
            .cache_dir
            .join(".locks")
            .join(folder)
            .join(format!("{etag}.lock"))
    }

    /// The commit the revision points to in the cache: the revision itself when it is a commit
    /// hash with a snapshot, else the content of `refs/<revision>`.
    fn cached_commit(&self) -> Option<String> {
        if is_commit_hash(&self.revision) && self.snapshot(&self.revision).is_dir() {
            return Some(self.revision.clone());
        }
        let text = std::fs::read_to_string(self.ref_path()).ok()?;
        let commit = text.trim();
        (is_safe_name(commit) && self.snapshot(commit).is_dir()).then(|| commit.to_string())
    }

    fn write_ref(&self, commit: &str) -> Result<()> {
        if self.revision == commit {
            return Ok(());
        }
        let path = self.ref_path();
        if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == commit) {
            return Ok(());
        }
        write_file_atomic(&path, commit.as_bytes())
    }

    /// A damaged cached file `file` of snapshot `snap`: offline an error that says so; online
    /// its pointer and blob are removed, so that it is downloaded again. `path`: the file the
    /// spec names, if any.
    fn replace_damaged(
        &self,
        snap: &Path,
        file: &str,
        problem: &str,
        path: Option<&str>,
    ) -> Result<()> {
        if self.settings.offline {
            return Err(hub_error(format!(
                "offline (HF_HUB_OFFLINE is set) and '{file}' of {} in the cache is damaged: \
                 {problem}; fetch it again with network access to replace it: unlearn fetch {}",
                self.describe(),
                self.fetch_spec(path),
            )));
        }
        tracing::warn!(
            "'{file}' of {} in the cache is damaged ({problem}); downloading it again",
            self.describe()
        );
        let pointer = snap.join(file);
        // the blob a symlinked pointer resolves to, when it lies in this repository's cache
        let blobs = self.dir.join("blobs");
        if let Ok(blob) = std::fs::canonicalize(&pointer) {
            if std::fs::canonicalize(&blobs).is_ok_and(|b| blob.starts_with(b)) {
                std::fs::remove_file(&blob).map_err(|e| Error::io(&blob, e))?;
            }
        }
        std::fs::remove_file(&pointer).map_err(|e| Error::io(&pointer, e))
    }

    /// `missing`: the file the cache lacks; `path`: the file the spec names, if any.
    fn offline_error(&self, missing: &str, path: Option<&str>) -> Error {
        let never = if self.cached_commit().is_none() {
            self.local_hint()
        } else {
            String::new()
        };
        hub_error(format!(
            "offline (HF_HUB_OFFLINE is set) and '{missing}' of {} is not in the cache {}{never}; \
             fetch it once with network access: unlearn fetch {}",
            self.describe(),
            self.settings.cache_dir.display(),
            self.fetch_spec(path),
        ))
    }
}

/// A temporary sibling of `path`, unique within this process and across processes.
fn tmp_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(
        ".{}.{}.{n}.tmp",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ))
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tmp_sibling(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Why the safetensors file at `path` is damaged (its header does not match its size, or is
/// not a header), or `None` when it reads, is not a `.safetensors` file, or cannot be opened at
/// all (a permission error is not damage: loading reports it, and the file stays). Downloads
/// are verified, but a blob can still be cut short afterwards (a cache copied onto a full
/// disk, another tool writing it) and would pass for complete.
fn safetensors_problem(path: &Path) -> Option<String> {
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !is_safetensors {
        return None;
    }
    match crate::model::weights::SafetensorsFile::open(path) {
        Err(e @ Error::Safetensors { .. }) => Some(e.to_string()),
        _ => None,
    }
}

/// The first safetensors file of a cached snapshot that cannot be read, with the problem.
fn damaged_safetensors(snap: &Path) -> Option<(String, String)> {
    list_snapshot(snap)
        .into_iter()
        .find_map(|f| safetensors_problem(&snap.join(&f)).map(|problem| (f, problem)))
}

/// Every file below `dir` as a `/`-separated relative path (depth and count bounded).
fn list_snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((d, prefix, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let path = entry.path();
            if path.is_dir() {
                if depth < 32 {
                    stack.push((path, rel, depth + 1));
                }
            } else if path.is_file() {
                out.push(rel);
                if out.len() > 1_000_000 {
                    return out;
                }
            }
        }
    }
    out.sort();
    out
}

/// The first file a cached snapshot lacks for this request, or `None` when it can be used
/// without the network.
fn snapshot_missing(snap: &Path, kind: RepoKind, include: &[String]) -> Option<String> {
    if !snap.is_dir() {
        return Some(if kind == RepoKind::Model {
            "config.json".into()
        } else {
            "snapshot".into()
        });
    }
    if kind == RepoKind::Model {
        let has_config = snap.join("config.json").is_file();
        let has_adapter = snap.join(ADAPTER_CONFIG).is_file();
        if !has_config && !has_adapter {
            return Some("config.json".into());
        }
        let index = snap.join(INDEX_FILE);
        if index.is_file() {
            match read_index_shards(&index) {
                Ok(shards) => {
                    if let Some(s) = shards.into_iter().find(|s| !snap.join(s).is_file()) {
                        return Some(s);
                    }
                }
                Err(_) => return Some(INDEX_FILE.into()),
            }
        } else if has_adapter && !has_config {
            if !snap.join(ADAPTER_WEIGHTS).is_file() {
                return Some(ADAPTER_WEIGHTS.into());
            }
        } else if !snap.join(SINGLE_WEIGHTS).is_file() {
            return Some(SINGLE_WEIGHTS.into());
        }
    }
    let files = if include.is_empty() {
        if kind == RepoKind::Dataset && list_snapshot(snap).is_empty() {
            return Some("snapshot".into());
        }
        Vec::new()
    } else {
        list_snapshot(snap)
    };
    include
        .iter()
        .find(|g| !files.iter().any(|f| glob_match(g, f)))
        .map(|g| format!("files matching '{g}'"))
}

/// The unique shard file names of a `model.safetensors.index.json`, each a safe relative path.
fn read_index_shards(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let parsed: Index = crate::error::read_json(index)?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    for s in &shards {
        check_rel_path(s).map_err(|why| Error::config(index, format!("bad shard name: {why}")))?;
    }
    Ok(shards.into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------------------------

fn fetch_snapshot(settings: &HubSettings, repo: &RepoCache, include: &[String]) -> Result<PathBuf> {
    let mut missing = "config.json".to_string();
    if let Some(commit) = repo.cached_commit() {
        let snap = repo.snapshot(&commit);
        // Which files make a whole dataset is only known from the hub: online, always ask.
        let whole_dataset = repo.kind == RepoKind::Dataset && include.is_empty();
        match snapshot_missing(&snap, repo.kind, include) {
            None if whole_dataset && !settings.offline => missing = "snapshot".into(),
            None => match damaged_safetensors(&snap) {
                None => {
                    tracing::debug!("{} found in the cache: {}", repo.describe(), snap.display());
                    return Ok(snap);
                }
                Some((file, problem)) => {
                    repo.replace_damaged(&snap, &file, &problem, None)?;
                    missing = file;
                }
            },
            Some(m) => missing = m,
        }
    } else if repo.kind == RepoKind::Dataset {
        missing = "snapshot".into();
    }
    if settings.offline {
        return Err(repo.offline_error(&missing, None));
    }
    let client = Client::new(settings)?;
    let (commit, listing) = client.repo_info(repo)?;
    let mut wanted: Vec<String> = Vec::new();
    fn add(f: &str, wanted: &mut Vec<String>) {
        if !wanted.iter().any(|w| w == f) {
            wanted.push(f.to_string());
        }
    }
    if repo.kind == RepoKind::Model {
        if listing.iter().any(|f| f == INDEX_FILE) {
            let index = client.ensure_file(repo, &commit, INDEX_FILE, None)?;
            for shard in read_index_shards(&index)? {
                if !listing.contains(&shard) {
                    return Err(hub_error(format!(
                        "{INDEX_FILE} of {} names the shard '{shard}', which the repository \
                         does not have",
                        repo.describe()
                    )));
                }
                add(&shard, &mut wanted);
            }
        } else if listing.iter().any(|f| f == SINGLE_WEIGHTS) {
            add(SINGLE_WEIGHTS, &mut wanted);
        }
        if listing.iter().any(|f| f == ADAPTER_WEIGHTS) {
            add(ADAPTER_WEIGHTS, &mut wanted);
        }
        if wanted.is_empty() && include.is_empty() {
            tracing::warn!(
                "{} has no model.safetensors or {INDEX_FILE}; only safetensors checkpoints are \
                 supported (pass --include to fetch other files)",
                repo.describe()
            );
        }
    }
    for g in include {
        let mut hit = false;
        for f in listing.iter().filter(|f| glob_match(g, f)) {
            hit = true;
            add(f, &mut wanted);
        }
        if !hit {
            return Err(hub_error(format!(
                "--include '{g}' matches no file of {}",
                repo.describe()
            )));
        }
    }
    if repo.kind == RepoKind::Dataset && include.is_empty() {
        for f in &listing {
            add(f, &mut wanted);
        }
    }
    // Small metadata files last: config.json appears once the weights are complete.
    if repo.kind == RepoKind::Model {
        for f in MODEL_FILES {
            if listing.iter().any(|l| l == f) {
                add(f, &mut wanted);
            }
        }
    }
    for f in &wanted {
        client.ensure_file(repo, &commit, f, None)?;
    }
    repo.write_ref(&commit)?;
    Ok(repo.snapshot(&commit))
}

fn fetch_one_file(settings: &HubSettings, repo: &RepoCache, path: &str) -> Result<PathBuf> {
    if let Some(commit) = repo.cached_commit() {
        let snap = repo.snapshot(&commit);
        let p = snap.join(path);
        if p.is_file() {
            match safetensors_problem(&p) {
                None => return Ok(p),
                Some(problem) => repo.replace_damaged(&snap, path, &problem, Some(path))?,
            }
        }
    }
    if settings.offline {
        return Err(repo.offline_error(path, Some(path)));
    }
    let client = Client::new(settings)?;
    let meta = client.file_metadata(repo, &repo.revision, path)?;
    let commit = match &meta.commit {
        Some(c) => c.clone(),
        None if is_commit_hash(&repo.revision) => repo.revision.clone(),
        None => {
            return Err(hub_error(format!(
                "the hub did not say which commit '{path}' of {} is at (no X-Repo-Commit header)",
                repo.describe()
            )))
        }
    };
    let local = client.ensure_file(repo, &commit, path, Some(meta))?;
    repo.write_ref(&commit)?;
    Ok(local)
}

/// Errors of the hub layer (a dedicated `Error::Hub` variant would replace this).
fn hub_error(msg: String) -> Error {
    Error::Hub(msg)
}

/// Percent-encode for a URL path; `/` kept when `keep_slash`.
fn url_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else if b == b'/' && keep_slash {
            out.push('/');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host[:port]` of a URL.
fn url_origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// Whether a URL's host is a loopback address (no proxy for those).
fn is_loopback(url: &str) -> bool {
    let origin = url_origin(url);
    let host = origin.split("://").nth(1).unwrap_or(origin);
    let host = host.rsplit_once('@').map(|(_, h)| h).unwrap_or(host);
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

/// Total size from `Content-Range: bytes a-b/total` (or `bytes */total`).
fn content_range_total(v: &str) -> Option<u64> {
    v.rsplit('/').next()?.trim().parse().ok()
}

/// Start offset from `Content-Range: bytes a-b/total`.
fn content_range_start(v: &str) -> Option<u64> {
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    v.split('-').next()?.trim().parse().ok()
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Metadata of one file at one revision.
#[derive(Debug, Clone)]
struct FileMeta {
    commit: Option<String>,
    etag: String,
    size: u64,
}

/// An HTTP answer, detached from ureq's types.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Box<dyn Read>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Read and drop a little of the body so the connection can be reused.
    fn drain(mut self) {
        let _ = std::io::copy(&mut (&mut self.body).take(64 << 10), &mut std::io::sink());
    }
}

/// Outcome of one download attempt.
enum Attempt {
    Done,
    /// Transport trouble worth a resumed retry.
    Retry(String),
}

struct Client<'a> {
    settings: &'a HubSettings,
    api: hf_hub::api::sync::ApiRepo,
}

impl<'a> Client<'a> {
    fn new(settings: &'a HubSettings) -> Result<Self> {
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(
            settings.cache_dir.clone(),
        ))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(false)
        .with_retries(0)
        .with_user_agent("unlearn", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| hub_error(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client {
            settings,
            api: api.model("unlearn/unlearn".to_string()),
        })
    }

    /// GET `url` through hf-hub's agent. Status codes are returned, not turned into errors.
    fn get(&self, url: &str, range: Option<&str>, follow_redirects: bool) -> Result<Resp> {
        let mut req = self.api.info_request().uri(url);
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let mut cfg = req
            .config()
            .http_status_as_error(false)
            .accept_encoding("identity")
            .max_redirects(if follow_redirects { 10 } else { 0 })
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(120)));
        if is_loopback(url) {
            cfg = cfg.proxy(None);
        }
        let resp = cfg
            .build()
            .call()
            .map_err(|e| hub_error(format!("GET {url}: {e}")))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let body: Box<dyn Read> = Box::new(resp.into_body().into_reader());
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    fn repo_url(&self, repo: &RepoCache) -> String {
        match repo.kind {
            RepoKind::Model => format!("{}/{}", self.settings.endpoint, repo.repo_id),
            RepoKind::Dataset => format!("{}/datasets/{}", self.settings.endpoint, repo.repo_id),
        }
    }

    fn resolve_url(&self, repo: &RepoCache, revision: &str, file: &str) -> String {
        format!(
            "{}/resolve/{}/{}",
            self.repo_url(repo),
            url_encode(revision, false),
            url_encode(file, true)
        )
    }

    /// The error for a non-success status.
    fn status_error(&self, resp: &Resp, repo: &RepoCache, file: Option<&str>) -> Error {
        let status = resp.status;
        let code = resp.header("x-error-code").unwrap_or("");
        let what = repo.describe();
        let at = self.settings.endpoint.as_str();
        let file_part = file.map(|f| format!(" ('{f}')")).unwrap_or_default();
        let hint = repo.local_hint();
        let msg = match status {
            401 | 403 => {
                let (refused, todo) = if self.settings.token.is_some() {
                    (
                        " with the token in use",
                        "set HF_TOKEN to a token of an account that has access",
                    )
                } else {
                    (
                        "",
                        "set HF_TOKEN to an access token of an account that has access \
                         (https://huggingface.co/settings/tokens)",
                    )
                };
                if code == "RepoNotFound" {
                    format!(
                        "{what} not found on {at}, or it is private or gated \
                         (HTTP {status}{refused}){file_part}{hint}: check the name; if it exists, \
                         {todo}"
                    )
                } else {
                    format!(
                        "access to {what} denied (HTTP {status}{refused}){file_part}: the \
                         repository is gated or private; accept its terms on its hub page and \
                         {todo}"
                    )
                }
            }
            404 => match (code, file) {
                ("RevisionNotFound", _) => format!(
                    "revision '{}' not found in {} {} on {at} (HTTP 404)",
                    repo.revision,
                    repo.kind.word(),
                    repo.repo_id
                ),
                ("EntryNotFound", Some(f)) => {
                    format!("'{f}' not found in {what} on {at} (HTTP 404)")
                }
                (_, Some(f)) if code != "RepoNotFound" => format!(
                    "'{f}' of {what} not found on {at} (HTTP 404): the repository, the revision \
                     or the file does not exist"
                ),
                _ => format!("{what} not found on {at} (HTTP 404){file_part}{hint}"),
            },
            _ => {
                let detail = resp
                    .header("x-error-message")
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                format!("HTTP {status} from {at} for {what}{file_part}{detail}")
            }
        };
        hub_error(msg)
    }

    /// The commit a revision points to and the files of the repository there.
    fn repo_info(&self, repo: &RepoCache) -> Result<(String, Vec<String>)> {
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            sha: String,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.settings.endpoint,
            repo.kind.plural(),
            repo.repo_id,
            url_encode(&repo.revision, false)
        );
        let resp = self.get(&url, None, true)?;
        if resp.status != 200 {
            return Err(self.status_error(&resp, repo, None));
        }
        let info: Info = serde_json::from_reader(resp.body.take(MAX_JSON_BYTES))
            .map_err(|e| hub_error(format!("{url}: invalid answer from the hub: {e}")))?;
        if !is_safe_name(&info.sha) {
            return Err(hub_error(format!("{url}: invalid commit '{}'", info.sha)));
        }
        let mut files = Vec::with_capacity(info.siblings.len());
        for s in info.siblings {
            match check_rel_path(&s.rfilename) {
                Ok(()) => files.push(s.rfilename),
                Err(why) => tracing::warn!("skipping a file of {}: {why}", repo.describe()),
            }
        }
        Ok((info.sha, files))
    }

    /// Commit, etag and size of a file (`Range: bytes=0-0`, relative redirects followed).
    fn file_metadata(&self, repo: &RepoCache, revision: &str, file: &str) -> Result<FileMeta> {
        let mut url = self.resolve_url(repo, revision, file);
        let mut resp = self.get(&url, Some("bytes=0-0"), false)?;
        let mut hops = 0;
        while matches!(resp.status, 301 | 302 | 303 | 307 | 308) {
            let Some(loc) = resp.header("location").map(str::to_string) else {
                break;
            };
            if !loc.starts_with('/') || loc.starts_with("//") {
                break; // absolute: the CDN of an LFS file; this answer has the metadata
            }
            hops += 1;
            if hops > MAX_RELATIVE_REDIRECTS {
                return Err(hub_error(format!("{url}: too many redirects")));
            }
            url = format!("{}{loc}", url_origin(&url));
            resp.drain();
            resp = self.get(&url, Some("bytes=0-0"), false)?;
        }
        let ok = matches!(resp.status, 200 | 206 | 301 | 302 | 303 | 307 | 308 | 416);
        if !ok {
            return Err(self.status_error(&resp, repo, Some(file)));
        }
        let etag = resp
            .header("x-linked-etag")
            .or_else(|| resp.header("etag"))
            .map(normalize_etag)
            .ok_or_else(|| hub_error(format!("{url}: the hub answer has no ETag")))?;
        if !is_safe_name(&etag) {
            return Err(hub_error(format!("{url}: unusable ETag '{etag}'")));
        }
        let size = resp
            .header("x-linked-size")
            .and_then(|v| v.trim().parse().ok())
            .or_else(|| resp.header("content-range").and_then(content_range_total))
            .or_else(|| {
                (resp.status == 200)
                    .then(|| resp.header("content-length")?.trim().parse().ok())
                    .flatten()
            })
            .ok_or_else(|| hub_error(format!("{url}: the hub answer gives no file size")))?;
        let commit = resp
            .header("x-repo-commit")
            .map(|c| c.trim().to_string())
            .filter(|c| is_safe_name(c));
        resp.drain();
        Ok(FileMeta { commit, etag, size })
    }

    /// Make `snapshots/<commit>/<file>` exist, downloading its blob when needed.
    fn ensure_file(
        &self,
        repo: &RepoCache,
        commit: &str,
        file: &str,
        meta: Option<FileMeta>,
    ) -> Result<PathBuf> {
        let pointer = repo.snapshot(commit).join(file);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let meta = match meta {
            Some(m) => m,
            None => self.file_metadata(repo, commit, file)?,
        };
        let blob = repo.blob(&meta.etag);
        if !blob_ok(&blob, meta.size)? {
            let blobs = repo.dir.join("blobs");
            std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
            let _lock = lock_file(&repo.lock_path(&meta.etag))?;
            // Another process may have finished it while we waited.
            if !blob_ok(&blob, meta.size)? {
                let url = self.resolve_url(repo, commit, file);
                self.download(repo, &url, file, &meta, &blob)?;
            }
        }
        link_pointer(&blob, &pointer, file)?;
        Ok(pointer)
    }

    /// Download into `<blob>.incomplete` (resuming it), verify, rename to `blob`.
    fn download(
        &self,
        repo: &RepoCache,
        url: &str,
        file: &str,
        meta: &FileMeta,
        blob: &Path,
    ) -> Result<()> {
        let part = blob.with_file_name(format!("{}.incomplete", meta.etag));
        let expected_sha = lfs_sha256(&meta.etag);
        let bar = self.progress_bar(file, meta.size);
        tracing::info!(
            "downloading '{file}' of {} ({} bytes)",
            repo.describe(),
            meta.size
        );
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| Error::io(&part, e))?;
        let mut retries = 0u32;
        let mut restarted = false;
        loop {
            let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            let attempt = if have > meta.size {
                truncate(&part)?;
                continue;
            } else if have < meta.size {
                self.fetch_range(repo, url, file, &part, have, meta.size, &bar)?
            } else {
                Attempt::Done
            };
            if let Attempt::Retry(why) = attempt {
                if retries < self.settings.max_retries {
                    retries += 1;
                    tracing::warn!("download of '{file}' interrupted ({why}); resuming");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(retries)));
                    continue;
                }
                bar.abandon();
                return Err(hub_error(format!(
                    "download of '{file}' of {} failed: {why}; the partial file {} is kept and \
                     the next run resumes it",
                    repo.describe(),
                    part.display()
                )));
            }
            if let Some(expected) = &expected_sha {
                let got = sha256_file(&part)?;
                if &got != expected {
                    let _ = std::fs::remove_file(&part);
                    if have > 0 && !restarted {
                        // The resumed prefix may have been stale: start over once.
                        restarted = true;
                        tracing::warn!("'{file}': checksum mismatch after resuming; restarting");
                        continue;
                    }
                    bar.abandon();
                    return Err(hub_error(format!(
                        "'{file}' of {} is corrupted: sha256 {got}, expected {expected}; the \
                         download was discarded",
                        repo.describe()
                    )));
                }
            }
            let f = File::open(&part).map_err(|e| Error::io(&part, e))?;
            f.sync_all().map_err(|e| Error::io(&part, e))?;
            drop(f);
            std::fs::rename(&part, blob).map_err(|e| Error::io(blob, e))?;
            bar.finish_and_clear();
            return Ok(());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch_range(
        &self,
        repo: &RepoCache,
        url: &str,
        file: &str,
        part: &Path,
        have: u64,
        size: u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<Attempt> {
        let range = format!("bytes={have}-");
        let resp = match self.get(url, Some(&range), true) {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Retry(e.to_string())),
        };
        let mut start = have;
        match resp.status {
            206 => {
                let got = resp.header("content-range").and_then(content_range_start);
                if got != Some(have) {
                    truncate(part)?;
                    return Ok(Attempt::Retry(format!(
                        "the server answered range {:?} to {range}",
                        resp.header("content-range")
                    )));
                }
            }
            200 => {
                // The server ignored the range: start over.
                if have > 0 {
                    truncate(part)?;
                }
                start = 0;
            }
            416 => {
                truncate(part)?;
                return Ok(Attempt::Retry("the server refused the resume range".into()));
            }
            401 | 403 | 404 => return Err(self.status_error(&resp, repo, Some(file))),
            s if s >= 500 || s == 429 => return Ok(Attempt::Retry(format!("HTTP {s}"))),
            _ => return Err(self.status_error(&resp, repo, Some(file))),
        }
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(|e| Error::io(part, e))?;
        bar.set_position(start);
        let mut written = start;
        let mut body = resp.body;
        let mut buf = vec![0u8; 256 << 10];
        while written < size {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    out.flush().map_err(|e| Error::io(part, e))?;
                    return Ok(Attempt::Retry(format!(
                        "connection lost after {written} of {size} bytes: {e}"
                    )));
                }
            };
            let n = n.min((size - written) as usize);
            out.write_all(&buf[..n]).map_err(|e| Error::io(part, e))?;
            written += n as u64;
            bar.set_position(written);
        }
        out.flush().map_err(|e| Error::io(part, e))?;
        if written < size {
            return Ok(Attempt::Retry(format!(
                "connection closed after {written} of {size} bytes"
            )));
        }
        Ok(Attempt::Done)
    }

    fn progress_bar(&self, file: &str, size: u64) -> indicatif::ProgressBar {
        if !self.settings.progress {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(size),
            indicatif::ProgressDrawTarget::stderr(),
        );
        let style = indicatif::ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_message(file.to_string());
        bar
    }
}

fn truncate(path: &Path) -> Result<()> {
    File::create(path).map(drop).map_err(|e| Error::io(path, e))
}

/// Whether a blob is present with the right size; a wrong-sized one is removed.
fn blob_ok(blob: &Path, size: u64) -> Result<bool> {
    match std::fs::metadata(blob) {
        Ok(m) if m.len() == size => Ok(true),
        Ok(_) => {
            tracing::warn!("{}: wrong size; downloading it again", blob.display());
            std::fs::remove_file(blob).map_err(|e| Error::io(blob, e))?;
            Ok(false)
        }
        Err(_) => Ok(false),
    }
}

/// An exclusive lock on `path` (created), waiting a bounded time for another process.
fn lock_file(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let start = Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => {
                if start.elapsed() > LOCK_WAIT {
                    return Err(hub_error(format!(
                        "{}: another process has been downloading this file for {} s; try again later",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                // File systems without locks: go on unlocked, as huggingface_hub does.
                tracing::debug!("{}: cannot lock ({e}); continuing", path.display());
                return Ok(f);
            }
        }
    }
}

/// `snapshots/<commit>/<file>` -> `../../blobs/<etag>` (one more `..` per folder in `file`), as
/// Python writes it; a copy where symlinks are not available.
fn link_pointer(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    if std::fs::symlink_metadata(pointer).is_ok() {
        if pointer.is_file() {
            return Ok(());
        }
        // A dangling link (its blob was deleted).
        std::fs::remove_file(pointer).map_err(|e| Error::io(pointer, e))?;
    }
    let mut target = PathBuf::new();
    for _ in 0..(file.split('/').count() + 1) {
        target.push("..");
    }
    target.push("blobs");
    if let Some(name) = blob.file_name() {
        target.push(name);
    }
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(&target, pointer);
    #[cfg(windows)]
    let linked = std::os::windows::fs::symlink_file(&target, pointer);
    #[cfg(not(any(unix, windows)))]
    let linked: std::io::Result<()> = Err(std::io::Error::other("no symlinks"));
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && pointer.is_file() => Ok(()),
        Err(_) => {
            let tmp = tmp_sibling(pointer);
            std::fs::copy(blob, &tmp).map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, pointer).map_err(|e| Error::io(pointer, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings_from(vars: &[(&str, &str)]) -> HubSettings {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubSettings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn from_env_defaults() {
        let s = settings_from(&[("HOME", "/home/u")]);
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(!s.offline);
        let s = settings_from(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(s.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    }

    #[test]
    fn from_env_cache_and_endpoint() {
        let s = settings_from(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "~/hf"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/ "),
        ]);
        assert_eq!(s.cache_dir, PathBuf::from("/home/u/hf/hub"));
        assert_eq!(s.endpoint, "http://127.0.0.1:9");
        let s = settings_from(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "/c")]);
        assert_eq!(s.cache_dir, PathBuf::from("/c"));
        let s = settings_from(&[("HF_HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/legacy")]);
        assert_eq!(s.cache_dir, PathBuf::from("/legacy"));
        let s = settings_from(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "")]);
        assert_eq!(s.cache_dir, PathBuf::from("/h/hub"));
    }

    #[test]
    fn from_env_offline_values() {
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("YES", true),
            ("on", true),
            ("0", false),
            ("false", false),
            ("", false),
        ] {
            let s = settings_from(&[("HF_HOME", "/h"), ("HF_HUB_OFFLINE", v)]);
            assert_eq!(s.offline, want, "HF_HUB_OFFLINE={v}");
        }
    }

    #[test]
    fn from_env_token_sources_and_redaction() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        std::fs::write(dir.path().join("token"), "hf_from_file\n").unwrap();
        let s = settings_from(&[("HF_HOME", home)]);
        assert_eq!(s.token.as_deref(), Some("hf_from_file"));
        let s = settings_from(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]);
        assert_eq!(s.token.as_deref(), Some("hf_env"));
        let s = settings_from(&[("HF_HOME", home), ("HUGGING_FACE_HUB_TOKEN", "hf_old")]);
        assert_eq!(s.token.as_deref(), Some("hf_old"));
        std::fs::write(dir.path().join("other"), "hf_path").unwrap();
        let other = dir.path().join("other");
        let s = settings_from(&[
            ("HF_HOME", "/nowhere"),
            ("HF_TOKEN_PATH", other.to_str().unwrap()),
        ]);
        assert_eq!(s.token.as_deref(), Some("hf_path"));
        let s = settings_from(&[("HF_HOME", "/nowhere"), ("HF_TOKEN", "  ")]);
        assert_eq!(s.token, None);
        let s = settings_from(&[("HF_HOME", home), ("HF_TOKEN", "hf_secret_value")]);
        let shown = format!("{s:?}");
        assert!(!shown.contains("hf_secret_value"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn parses_specs() {
        let r = parse_hub_spec("meta-llama/Llama-3.2-1B-Instruct").unwrap();
        assert_eq!(r.kind, RepoKind::Model);
        assert_eq!(r.repo_id, "meta-llama/Llama-3.2-1B-Instruct");
        assert_eq!(r.revision, None);
        assert_eq!(r.path, None);
        let r = parse_hub_spec("org/name@v1.0").unwrap();
        assert_eq!(r.revision.as_deref(), Some("v1.0"));
        let r = parse_hub_spec("hf://datasets/locuslab/TOFU@main/sub/forget10.json").unwrap();
        assert_eq!(r.kind, RepoKind::Dataset);
        assert_eq!(r.repo_id, "locuslab/TOFU");
        assert_eq!(r.revision.as_deref(), Some("main"));
        assert_eq!(r.path.as_deref(), Some("sub/forget10.json"));
        let r = parse_hub_spec("hf://datasets/locuslab/TOFU").unwrap();
        assert_eq!((r.revision, r.path), (None, None));
        let r = parse_hub_spec("hf://org/m@refs%2Fpr%2F1/config.json").unwrap();
        assert_eq!(r.kind, RepoKind::Model);
        assert_eq!(r.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(r.path.as_deref(), Some("config.json"));
        for bad in [
            "gpt2",
            "a/b/c",
            "org/na me",
            "org/..",
            "org/a--b",
            "hf://datasets/org",
            "hf://datasets/org/n/../x",
            "hf://datasets/org/n@../x/f",
            "hf://spaces/org/n",
            "org/name@",
            "/abs/does/not/exist",
        ] {
            assert!(parse_hub_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_paths_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().to_str().unwrap().to_string();
        assert_eq!(
            parse_spec(&p).unwrap(),
            Spec::Local(dir.path().to_path_buf())
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.bin", "pytorch_model.bin"));
        assert!(glob_match("*.bin", "sub/x.bin"));
        assert!(!glob_match("*.bin", "model.safetensors"));
        assert!(glob_match(
            "model-?????-of-*.safetensors",
            "model-00001-of-00002.safetensors"
        ));
        assert!(glob_match("original/", "original/params.json"));
        assert!(glob_match("config.json", "config.json"));
        assert!(!glob_match("config.json", "xconfig.json"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b*c", "abx"));
    }

    #[test]
    fn header_helpers() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(content_range_total("bytes 0-0/1234"), Some(1234));
        assert_eq!(content_range_total("bytes */77"), Some(77));
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        let sha = "a".repeat(64);
        assert_eq!(lfs_sha256(&sha), Some(sha.clone()));
        assert_eq!(lfs_sha256(&"a".repeat(40)), None);
        assert!(is_loopback("http://127.0.0.1:8080/x"));
        assert!(is_loopback("http://localhost/x"));
        assert!(is_loopback("http://[::1]:80/x"));
        assert!(!is_loopback("https://huggingface.co/x"));
        assert_eq!(url_origin("http://127.0.0.1:5/a/b"), "http://127.0.0.1:5");
        assert_eq!(url_encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(url_encode("a b/c.json", true), "a%20b/c.json");
        assert!(!is_safe_name("../x"));
        assert!(is_safe_name(&"f".repeat(64)));
    }
}
