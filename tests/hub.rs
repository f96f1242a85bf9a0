//! The hub layer against a fake hub on 127.0.0.1 (tests/hub_support). No test touches the real
//! network or the process environment: each builds its own `HubSettings` (endpoint = the fake
//! hub, cache = a temporary directory).
mod hub_support;

use candle_core::{DType, Device};
use hub_support::{commit_id, dir_files, etag_of, sha256_hex, FakeHub, FakeRepo, Files};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use unlearn::hub::{fetch_with, resolve_file_with, resolve_model_with, HubSettings};
use unlearn::model::Decoder;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn settings(hub: &FakeHub, tmp: &tempfile::TempDir) -> HubSettings {
    let mut s = HubSettings::new(hub.url.clone(), tmp.path().join("hub"));
    s.max_retries = 0;
    s
}

fn err_text(r: unlearn::Result<PathBuf>) -> String {
    match r {
        Ok(p) => panic!("expected an error, got {}", p.display()),
        Err(e) => e.to_string(),
    }
}

/// Every file below `dir`, relative, `/`-separated.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.path().is_dir() {
                stack.push((e.path(), format!("{name}/")));
            } else {
                out.insert(name);
            }
        }
    }
    out
}

fn sharded_files() -> Files {
    let mut files = dir_files(&fixture("llama-sharded"));
    files.insert("pytorch_model.bin".into(), b"pickled weights".to_vec());
    files.insert("README.md".into(), b"# a model\n".to_vec());
    files
}

/// A hub serving `files` as fake-org/llama-sharded, branch main at `commit_id(1)`.
fn sharded_hub(files: &Files) -> FakeHub {
    let repo = FakeRepo::model("fake-org/llama-sharded");
    FakeHub::start(vec![repo.with_commit("main", &commit_id(1), files.clone())])
}

const SHARD3: &str = "model-00003-of-00012.safetensors";

fn cdn_requests(hub: &FakeHub, sha: &str) -> Vec<hub_support::Request> {
    hub.log()
        .into_iter()
        .filter(|r| r.path == format!("/cdn/{sha}"))
        .collect()
}

#[test]
fn sharded_model_download_fetches_only_the_needed_files_in_python_layout() {
    let files = sharded_files();
    let c1 = commit_id(1);
    let hub = sharded_hub(&files);
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(&hub, &tmp);

    let snap = fetch_with(&s, "fake-org/llama-sharded", None, &[]).unwrap();
    let repo_dir = tmp.path().join("hub/models--fake-org--llama-sharded");
    assert_eq!(snap, repo_dir.join("snapshots").join(&c1));

    let mut expected: BTreeSet<String> = (1..=12)
        .map(|i| format!("model-{i:05}-of-00012.safetensors"))
        .collect();
    for f in [
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        expected.insert(f.to_string());
    }
    // Not reference.safetensors (not in the index), not *.bin, not README.md.
    assert_eq!(tree(&snap), expected);

    for name in &expected {
        let pointer = snap.join(name);
        assert_eq!(std::fs::read(&pointer).unwrap(), files[name], "{name}");
        let etag = etag_of(name, &files[name]);
        // Exactly what huggingface_hub writes: a relative link into blobs/<etag>.
        let target = std::fs::read_link(&pointer).unwrap();
        assert_eq!(target, Path::new("../../blobs").join(&etag), "{name}");
        assert!(repo_dir.join("blobs").join(&etag).is_file());
    }
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        c1
    );
    let leftovers: Vec<String> = tree(&repo_dir.join("blobs"))
        .into_iter()
        .filter(|f| f.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The snapshot is a loadable checkpoint.
    let model = Decoder::load(&snap, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.num_parameters(), 115008);

    // Re-running finds everything in the cache: no request at all.
    hub.clear_log();
    assert_eq!(
        fetch_with(&s, "fake-org/llama-sharded", None, &[]).unwrap(),
        snap
    );
    assert_eq!(
        resolve_model_with(&s, "fake-org/llama-sharded").unwrap(),
        snap
    );
    assert!(hub.log().is_empty(), "{:?}", hub.log());

    // An explicit include glob adds *.bin, and only that is downloaded.
    let snap2 = fetch_with(&s, "fake-org/llama-sharded", None, &["*.bin".into()]).unwrap();
    assert_eq!(snap2, snap);
    assert_eq!(
        std::fs::read(snap.join("pytorch_model.bin")).unwrap(),
        b"pickled weights"
    );
    let downloads: Vec<_> = hub
        .log()
        .into_iter()
        .filter(|r| r.path.starts_with("/cdn/") && r.range.as_deref() != Some("bytes=0-0"))
        .collect();
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    let e = err_text(fetch_with(
        &s,
        "fake-org/llama-sharded",
        None,
        &["*.gguf".into()],
    ));
    assert!(e.contains("*.gguf") && e.contains("matches no file"), "{e}");
}

#[test]
fn revision_pinning_by_tag_spec_and_commit() {
    let a = dir_files(&fixture("llama"));
    let mut b = a.clone();
    let mut cfg = b["config.json"].clone();
    cfg.extend_from_slice(b"\n");
    b.insert("config.json".into(), cfg.clone());
    let (c1, c2) = (commit_id(1), commit_id(2));
    let hub = FakeHub::start(vec![FakeRepo::model("fake-org/llama")
        .with_commit("v1", &c1, a.clone())
        .with_commit("main", &c2, b.clone())]);
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(&hub, &tmp);
    let repo_dir = tmp.path().join("hub/models--fake-org--llama");

    let v1 = fetch_with(&s, "fake-org/llama@v1", None, &[]).unwrap();
    assert_eq!(v1, repo_dir.join("snapshots").join(&c1));
    assert_eq!(
        std::fs::read(v1.join("config.json")).unwrap(),
        a["config.json"]
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v1")).unwrap(),
        c1
    );
    assert_eq!(
        fetch_with(&s, "fake-org/llama", Some("v1"), &[]).unwrap(),
        v1
    );

    hub.clear_log();
    let main = fetch_with(&s, "fake-org/llama", None, &[]).unwrap();
    assert_eq!(main, repo_dir.join("snapshots").join(&c2));
    assert_eq!(std::fs::read(main.join("config.json")).unwrap(), cfg);
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        c2
    );
    // model.safetensors is the same blob in both commits: linked, not downloaded again.
    let sha = sha256_hex(&a["model.safetensors"]);
    assert!(cdn_requests(&hub, &sha).is_empty(), "{:?}", hub.log());
    assert_eq!(
        std::fs::read_link(main.join("model.safetensors")).unwrap(),
        Path::new("../../blobs").join(&sha)
    );

    // A commit hash pins exactly, from the cache, and writes no ref.
    hub.clear_log();
    assert_eq!(
        fetch_with(&s, "fake-org/llama", Some(&c1), &[]).unwrap(),
        v1
    );
    assert_eq!(
        resolve_model_with(&s, &format!("fake-org/llama@{c1}")).unwrap(),
        v1
    );
    assert!(hub.log().is_empty(), "{:?}", hub.log());
    assert!(!repo_dir.join("refs").join(&c1).exists());

    let e = err_text(fetch_with(&s, "fake-org/llama@v1", Some("main"), &[]));
    assert!(e.contains("v1") && e.contains("main"), "{e}");
}

#[test]
fn interrupted_download_leaves_no_complete_looking_file_and_resumes() {
    let files = sharded_files();
    let c1 = commit_id(1);
    let hub = sharded_hub(&files);
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(&hub, &tmp); // no retries: the first call fails
    let repo_dir = tmp.path().join("hub/models--fake-org--llama-sharded");
    let snap = repo_dir.join("snapshots").join(&c1);
    let sha3 = sha256_hex(&files[SHARD3]);
    let full = files[SHARD3].len() as u64;

    hub.interrupt_once(SHARD3);
    let e = err_text(fetch_with(&s, "fake-org/llama-sharded", None, &[]));
    assert!(e.contains(SHARD3) && e.contains("resume"), "{e}");
    let part = repo_dir.join("blobs").join(format!("{sha3}.incomplete"));
    let have = std::fs::metadata(&part).unwrap().len();
    assert!(have > 0 && have < full, "partial {have} of {full}");
    assert!(!repo_dir.join("blobs").join(&sha3).exists());
    assert!(!snap.join(SHARD3).exists());
    assert!(!snap.join("config.json").exists());
    assert!(!repo_dir.join("refs/main").exists());
    let mut offline = s.clone();
    offline.offline = true;
    assert!(resolve_model_with(&offline, "fake-org/llama-sharded").is_err());

    hub.clear_log();
    let got = fetch_with(&s, "fake-org/llama-sharded", None, &[]).unwrap();
    assert_eq!(got, snap);
    assert_eq!(std::fs::read(snap.join(SHARD3)).unwrap(), files[SHARD3]);
    assert!(!part.exists());
    let resumed = cdn_requests(&hub, &sha3);
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(
        resumed[0].range.as_deref(),
        Some(format!("bytes={have}-").as_str())
    );
    // Shards completed before the interruption are neither probed nor downloaded again.
    for done in [
        "model-00001-of-00012.safetensors",
        "model-00002-of-00012.safetensors",
    ] {
        let sha = sha256_hex(&files[done]);
        assert!(cdn_requests(&hub, &sha).is_empty());
        assert!(!hub.log().iter().any(|r| r.path.ends_with(done)));
    }
}

#[test]
fn interrupted_download_is_retried_within_one_call() {
    let files = sharded_files();
    let hub = sharded_hub(&files);
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(&hub, &tmp);
    s.max_retries = 2;
    hub.interrupt_once(SHARD3);
    hub.interrupt_once("tokenizer.json"); // a plain (non-LFS) file too
    let snap = fetch_with(&s, "fake-org/llama-sharded", None, &[]).unwrap();
    assert_eq!(std::fs::read(snap.join(SHARD3)).unwrap(), files[SHARD3]);
    assert_eq!(
        std::fs::read(snap.join("tokenizer.json")).unwrap(),
        files["tokenizer.json"]
    );
    let reqs = cdn_requests(&hub, &sha256_hex(&files[SHARD3]));
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=0-"));
    assert_ne!(reqs[1].range.as_deref(), Some("bytes=0-"));
}

fn tofu_repo() -> FakeRepo {
    let mut c1 = Files::new();
    c1.insert(
        "forget01.json".into(),
        br#"[{"question":"q","answer":"a"}]"#.to_vec(),
    );
    c1.insert(
        "sub/retain.json".into(),
        br#"[{"question":"r","answer":"s"}]"#.to_vec(),
    );
    c1.insert("notes/empty.txt".into(), Vec::new());
    let mut c0 = Files::new();
    c0.insert("forget01.json".into(), br#"[]"#.to_vec());
    FakeRepo::dataset("fake-org/tofu")
        .with_commit("v0", &commit_id(10), c0)
        .with_commit("main", &commit_id(11), c1)
}

#[test]
fn dataset_files_download_with_revisions() {
    let hub = FakeHub::start(vec![tofu_repo()]);
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(&hub, &tmp);
    let repo_dir = tmp.path().join("hub/datasets--fake-org--tofu");

    let f = resolve_file_with(&s, "hf://datasets/fake-org/tofu/forget01.json").unwrap();
    assert_eq!(
        f,
        repo_dir
            .join("snapshots")
            .join(commit_id(11))
            .join("forget01.json")
    );
    assert_eq!(
        std::fs::read(&f).unwrap(),
        br#"[{"question":"q","answer":"a"}]"#
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit_id(11)
    );
    let nested = resolve_file_with(&s, "hf://datasets/fake-org/tofu/sub/retain.json").unwrap();
    let etag = etag_of("sub/retain.json", &std::fs::read(&nested).unwrap());
    assert_eq!(
        std::fs::read_link(&nested).unwrap(),
        Path::new("../../../blobs").join(etag)
    );
    let old = resolve_file_with(&s, "hf://datasets/fake-org/tofu@v0/forget01.json").unwrap();
    assert_eq!(std::fs::read(&old).unwrap(), b"[]");

    let whole = fetch_with(&s, "hf://datasets/fake-org/tofu", None, &[]).unwrap();
    assert_eq!(
        tree(&whole),
        ["forget01.json", "notes/empty.txt", "sub/retain.json"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert_eq!(std::fs::read(whole.join("notes/empty.txt")).unwrap(), b"");
    let e = err_text(resolve_model_with(&s, "hf://datasets/fake-org/tofu"));
    assert!(e.contains("dataset"), "{e}");
    let e = err_text(resolve_file_with(&s, "hf://datasets/fake-org/tofu"));
    assert!(e.contains("name a file"), "{e}");
}

#[test]
fn offline_use_from_a_filled_cache() {
    let files = sharded_files();
    let c1 = commit_id(1);
    let tmp = tempfile::tempdir().unwrap();
    let (snap, data, mut s) = {
        let hub = FakeHub::start(vec![
            FakeRepo::model("fake-org/llama-sharded").with_commit("main", &c1, files.clone()),
            tofu_repo(),
        ]);
        let s = settings(&hub, &tmp);
        let snap = resolve_model_with(&s, "fake-org/llama-sharded").unwrap();
        let data = resolve_file_with(&s, "hf://datasets/fake-org/tofu/forget01.json").unwrap();
        (snap, data, s)
    }; // the hub is gone: any request would fail
    s.offline = true;
    s.endpoint = "http://127.0.0.1:9".into();
    assert_eq!(
        resolve_model_with(&s, "fake-org/llama-sharded").unwrap(),
        snap
    );
    assert_eq!(
        resolve_file_with(&s, "hf://datasets/fake-org/tofu/forget01.json").unwrap(),
        data
    );
    Decoder::load(&snap, DType::F32, &Device::Cpu).unwrap();

    let e = err_text(resolve_model_with(&s, "fake-org/never-fetched"));
    assert!(
        e.contains("HF_HUB_OFFLINE")
            && e.contains("fake-org/never-fetched")
            && e.contains("config.json"),
        "{e}"
    );
    let e = err_text(resolve_file_with(
        &s,
        "hf://datasets/fake-org/tofu/forget05.json",
    ));
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("forget05.json"),
        "{e}"
    );

    // A snapshot missing a shard is not used, and the error names the shard.
    std::fs::remove_file(snap.join(SHARD3)).unwrap();
    let e = err_text(resolve_model_with(&s, "fake-org/llama-sharded"));
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains(SHARD3), "{e}");
}

/// A cached weight file cut short after its download was verified (a cache copied onto a full
/// disk, another tool writing it) is not passed off as the model: offline the error names the
/// file and the problem, online the file is downloaded again, whole.
#[test]
fn a_damaged_cached_weight_file_is_an_error_offline_and_downloaded_again_online() {
    let files = sharded_files();
    let hub = sharded_hub(&files);
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(&hub, &tmp);
    let snap = resolve_model_with(&s, "fake-org/llama-sharded").unwrap();
    let shard = snap.join(SHARD3);
    let whole = files[SHARD3].clone();
    let cut = |path: &Path| {
        // through the snapshot's symlink: the blob itself is cut
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(whole.len() as u64 - 100).unwrap();
    };
    let single = format!("hf://fake-org/llama-sharded/{SHARD3}");

    cut(&shard);
    s.offline = true;
    for spec in ["fake-org/llama-sharded", single.as_str()] {
        let e = err_text(fetch_with(&s, spec, None, &[]));
        assert!(
            e.contains(SHARD3)
                && e.contains("damaged")
                && e.contains("shorter or longer than its header says")
                && e.contains("unlearn fetch"),
            "{spec}: {e}"
        );
    }

    s.offline = false;
    let sha = sha256_hex(&whole);
    hub.clear_log();
    assert_eq!(
        resolve_model_with(&s, "fake-org/llama-sharded").unwrap(),
        snap
    );
    assert_eq!(std::fs::read(&shard).unwrap(), whole);
    assert_eq!(cdn_requests(&hub, &sha).len(), 1, "{:?}", hub.log());
    Decoder::load(&snap, DType::F32, &Device::Cpu).unwrap();

    // the same through a spec that names the file
    cut(&shard);
    hub.clear_log();
    assert_eq!(fetch_with(&s, &single, None, &[]).unwrap(), shard);
    assert_eq!(std::fs::read(&shard).unwrap(), whole);
    assert_eq!(cdn_requests(&hub, &sha).len(), 1, "{:?}", hub.log());
}

/// Write a cache exactly as Python's huggingface_hub does.
#[cfg(unix)]
fn python_cache(cache: &Path, folder: &str, commit: &str, files: &Files) {
    let repo = cache.join(folder);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (name, bytes) in files {
        let etag = etag_of(name, bytes);
        std::fs::write(repo.join("blobs").join(&etag), bytes).unwrap();
        let pointer = repo.join("snapshots").join(commit).join(name);
        std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        let mut target = PathBuf::new();
        for _ in 0..name.split('/').count() + 1 {
            target.push("..");
        }
        std::os::unix::fs::symlink(target.join("blobs").join(&etag), &pointer).unwrap();
    }
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    // huggingface_hub's marker for a file the hub does not have.
    let no_exist = repo.join(".no_exist").join(commit);
    std::fs::create_dir_all(&no_exist).unwrap();
    std::fs::write(no_exist.join("special_tokens_map.json"), b"").unwrap();
}

#[cfg(unix)]
#[test]
fn cache_written_by_python_is_used_offline_and_without_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let model = dir_files(&fixture("llama"));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    python_cache(&cache, "models--python-org--llama", commit, &model);
    let mut data = Files::new();
    data.insert("forget10.json".into(), b"[1]".to_vec());
    data.insert("nested/dir/f.json".into(), b"[2]".to_vec());
    python_cache(&cache, "datasets--locuslab--TOFU", commit, &data);

    // Online against a hub that knows neither repo: the cache answers, no request is made.
    let hub = FakeHub::start(vec![]);
    let mut s = HubSettings::new(hub.url.clone(), &cache);
    let snap = resolve_model_with(&s, "python-org/llama").unwrap();
    assert_eq!(
        snap,
        cache
            .join("models--python-org--llama/snapshots")
            .join(commit)
    );
    let f = resolve_file_with(&s, "hf://datasets/locuslab/TOFU/nested/dir/f.json").unwrap();
    assert_eq!(std::fs::read(f).unwrap(), b"[2]");
    assert!(hub.log().is_empty(), "{:?}", hub.log());

    s.offline = true;
    let snap2 = resolve_model_with(&s, &format!("python-org/llama@{commit}")).unwrap();
    assert_eq!(snap2, snap);
    let model = Decoder::load(&snap, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.num_parameters(), 115008);
    let f = resolve_file_with(&s, "hf://datasets/locuslab/TOFU/forget10.json").unwrap();
    assert_eq!(std::fs::read(f).unwrap(), b"[1]");
    assert!(hub.log().is_empty());
}

#[test]
fn gated_repositories_ask_for_hf_token_and_never_show_it() {
    let files = dir_files(&fixture("llama"));
    let hub = FakeHub::start(vec![
        FakeRepo::model("gated-org/llama")
            .with_commit("main", &commit_id(1), files.clone())
            .gated("hf_good_token", 401),
        FakeRepo::model("private-org/llama")
            .with_commit("main", &commit_id(2), files.clone())
            .gated("hf_good_token", 403),
        tofu_repo().gated("hf_good_token", 401),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(&hub, &tmp);

    let e = err_text(fetch_with(&s, "gated-org/llama", None, &[]));
    assert!(
        e.contains("HF_TOKEN") && e.contains("401") && e.contains("gated-org/llama"),
        "{e}"
    );
    let e = err_text(fetch_with(&s, "private-org/llama", None, &[]));
    assert!(e.contains("HF_TOKEN") && e.contains("403"), "{e}");
    let e = err_text(resolve_file_with(
        &s,
        "hf://datasets/fake-org/tofu/forget01.json",
    ));
    assert!(e.contains("HF_TOKEN") && e.contains("forget01.json"), "{e}");

    s.token = Some("hf_wrong_token_123".into());
    let e = err_text(fetch_with(&s, "gated-org/llama", None, &[]));
    assert!(
        e.contains("HF_TOKEN") && e.contains("token in use") && !e.contains("hf_wrong_token_123"),
        "{e}"
    );
    assert!(!format!("{s:?}").contains("hf_wrong_token_123"));

    s.token = Some("hf_good_token".into());
    hub.clear_log();
    let snap = fetch_with(&s, "gated-org/llama", None, &[]).unwrap();
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        files["model.safetensors"]
    );
    let log = hub.log();
    assert!(!log.is_empty());
    for r in log.iter().filter(|r| !r.path.starts_with("/cdn/")) {
        assert_eq!(r.auth.as_deref(), Some("Bearer hf_good_token"), "{r:?}");
    }
    resolve_file_with(&s, "hf://datasets/fake-org/tofu/forget01.json").unwrap();
}

#[test]
fn not_found_errors_name_the_repo_revision_and_file() {
    let hub = FakeHub::start(vec![
        FakeRepo::model("fake-org/llama").with_commit(
            "main",
            &commit_id(1),
            dir_files(&fixture("llama")),
        ),
        tofu_repo(),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(&hub, &tmp);

    let e = err_text(fetch_with(&s, "fake-org/missing", None, &[]));
    assert!(
        e.contains("fake-org/missing") && e.contains("main") && e.contains("404"),
        "{e}"
    );
    let e = err_text(resolve_model_with(&s, "fake-org/llama@nope"));
    assert!(
        e.contains("fake-org/llama") && e.contains("nope") && e.contains("404"),
        "{e}"
    );
    let e = err_text(resolve_file_with(
        &s,
        "hf://datasets/fake-org/tofu@main/absent.json",
    ));
    assert!(
        e.contains("absent.json") && e.contains("fake-org/tofu") && e.contains("main"),
        "{e}"
    );
    let e = err_text(resolve_file_with(
        &s,
        "hf://datasets/fake-org/tofu@v9/forget01.json",
    ));
    assert!(e.contains("v9") && e.contains("fake-org/tofu"), "{e}");
    // Nothing was left in the cache by the failures.
    let repo_dir = tmp.path().join("hub/models--fake-org--missing");
    assert!(!repo_dir.join("refs").exists());
}

#[test]
fn corrupted_download_is_rejected_and_discarded() {
    let files = dir_files(&fixture("llama"));
    let c1 = commit_id(1);
    let hub = FakeHub::start(vec![FakeRepo::model("fake-org/llama").with_commit(
        "main",
        &c1,
        files.clone(),
    )]);
    let tmp = tempfile::tempdir().unwrap();
    let mut s = settings(&hub, &tmp);
    s.max_retries = 2;
    let repo_dir = tmp.path().join("hub/models--fake-org--llama");
    let sha = sha256_hex(&files["model.safetensors"]);
    let blob = repo_dir.join("blobs").join(&sha);
    let part = repo_dir.join("blobs").join(format!("{sha}.incomplete"));
    let pointer = repo_dir
        .join("snapshots")
        .join(&c1)
        .join("model.safetensors");

    hub.set_corrupt("model.safetensors", true);
    let e = err_text(fetch_with(&s, "fake-org/llama", None, &[]));
    assert!(
        e.contains("sha256") && e.contains("model.safetensors"),
        "{e}"
    );
    assert!(!blob.exists() && !part.exists() && !pointer.exists());
    assert!(!repo_dir.join("refs/main").exists());
    assert_eq!(
        cdn_requests(&hub, &sha).len(),
        1,
        "a checksum failure is not retried"
    );

    // A stale partial file with wrong bytes: resumed, rejected, restarted once from scratch.
    hub.set_corrupt("model.safetensors", false);
    std::fs::write(&part, vec![7u8; files["model.safetensors"].len() / 2]).unwrap();
    hub.clear_log();
    let snap = fetch_with(&s, "fake-org/llama", None, &[]).unwrap();
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        files["model.safetensors"]
    );
    let reqs = cdn_requests(&hub, &sha);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=0-"));
    assert!(!part.exists());
}

#[test]
fn local_paths_come_first_and_bad_specs_are_explained() {
    let hub = FakeHub::start(vec![]);
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(&hub, &tmp);
    let local = fixture("llama");
    let local_str = local.to_str().unwrap();
    assert_eq!(resolve_model_with(&s, local_str).unwrap(), local);
    assert_eq!(fetch_with(&s, local_str, None, &[]).unwrap(), local);
    assert!(fetch_with(&s, local_str, Some("main"), &[]).is_err());
    let cfg = local.join("config.json");
    assert_eq!(resolve_file_with(&s, cfg.to_str().unwrap()).unwrap(), cfg);
    match resolve_file_with(&s, "no/such/file.json") {
        Err(unlearn::Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("{other:?}"),
    }
    let e = err_text(resolve_model_with(&s, "not-a-dir"));
    assert!(e.contains("not-a-dir"), "{e}");
    let e = err_text(resolve_model_with(&s, "some-org/not-a-dir"));
    assert!(e.contains("no local file or directory"), "{e}");
    assert!(hub.log().iter().all(|r| !r.path.contains("..")));
}
