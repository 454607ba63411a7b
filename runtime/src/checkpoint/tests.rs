use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

mod tensors;

/// An empty folder of its own for each test, under the system's temporary folder.
fn fresh_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stepguard-ckpt-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn file(name: &str, bytes: &[u8]) -> (String, Contents) {
    (name.to_string(), Contents::Bytes(bytes.to_vec()))
}

/// Two checkpoints, steps 1 and 2, each with a `model.bin` of 64 bytes and an `opt.bin`.
fn two_saves(test: &str) -> (Checkpoints, PathBuf, PathBuf) {
    let store = Checkpoints::new(fresh_dir(test));
    let first = store
        .save(
            1,
            vec![file("model.bin", &[1; 64]), file("opt.bin", b"one")],
            json!({"n": 1}),
        )
        .unwrap();
    let second = store
        .save(
            2,
            vec![file("model.bin", &[2; 64]), file("opt.bin", b"two")],
            json!({"n": 2}),
        )
        .unwrap();
    (
        store,
        first.path().to_path_buf(),
        second.path().to_path_buf(),
    )
}

/// `latest()` is the checkpoint at `want`, after passing over exactly `rejected`.
fn assert_latest(store: &Checkpoints, want: &Path, rejected: &[(&Path, &str)]) {
    let found = store.latest().unwrap().expect("a checkpoint");
    assert_eq!(found.checkpoint.path(), want);
    let got: Vec<(&Path, &str)> = found
        .rejected
        .iter()
        .map(|r| (r.path.as_path(), r.reason.as_str()))
        .collect();
    assert_eq!(got, rejected);
}

fn names_under(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn no_checkpoint_is_none() {
    let root = fresh_dir("none");
    assert!(Checkpoints::new(&root).latest().unwrap().is_none());
    std::fs::create_dir_all(root.join("unrelated")).unwrap();
    assert!(Checkpoints::new(&root).latest().unwrap().is_none());
}

#[test]
fn save_writes_files_and_manifest() {
    let store = Checkpoints::new(fresh_dir("save"));
    let saved = store
        .save(7, vec![file("a.bin", b"abc")], json!({"lr": 0.5}))
        .unwrap();
    assert_eq!(saved.path(), store.root().join("step-0000000007"));
    assert_eq!(names_under(store.root()), ["step-0000000007"]);
    assert_eq!(names_under(saved.path()), ["a.bin", "manifest.json"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(saved.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["version"], 1);
    assert_eq!(manifest["step"], 7);
    assert_eq!(manifest["meta"], json!({"lr": 0.5}));
    assert_eq!(
        manifest["files"],
        json!([{"name": "a.bin", "size": 3,
                "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}])
    );
    let loaded = load(saved.path()).unwrap();
    assert_eq!((loaded.step(), loaded.meta()), (7, &json!({"lr": 0.5})));
    assert_eq!(loaded.read("a.bin").unwrap(), b"abc");
    assert!(matches!(
        loaded.read("b.bin"),
        Err(CheckpointError::NoSuchFile { .. })
    ));
}

#[test]
fn flipped_byte_is_passed_over() {
    let (store, first, second) = two_saves("flip");
    let path = second.join("model.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[17] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    assert_latest(
        &store,
        &first,
        &[(&second, "file model.bin: SHA-256 mismatch")],
    );
    let err = load(&second).unwrap_err();
    assert!(
        err.to_string().contains("file model.bin: SHA-256 mismatch"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_passed_over() {
    let (store, first, second) = two_saves("truncate");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(second.join("model.bin"))
        .unwrap();
    f.set_len(40).unwrap();
    assert_latest(
        &store,
        &first,
        &[(&second, "file model.bin: 40 bytes, manifest says 64")],
    );
}

#[test]
fn missing_file_is_passed_over() {
    let (store, first, second) = two_saves("missing-file");
    std::fs::remove_file(second.join("opt.bin")).unwrap();
    assert_latest(&store, &first, &[(&second, "file opt.bin: missing")]);
}

#[test]
fn missing_manifest_is_an_unfinished_save() {
    let (store, first, second) = two_saves("manifest");
    std::fs::remove_file(second.join("manifest.json")).unwrap();
    assert_latest(
        &store,
        &first,
        &[(&second, "manifest missing: the save did not finish")],
    );
}

#[test]
fn temporary_folder_is_passed_over_then_removed() {
    let (store, _, second) = two_saves("tmp");
    // A save of step 3 by a process that is gone (no pid is this large).
    let tmp = store.root().join(".step-0000000003.tmp-999999999");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("model.bin"), [3; 64]).unwrap();
    assert_latest(
        &store,
        &second,
        &[(&tmp, "temporary folder: the save did not finish")],
    );
    assert!(matches!(load(&tmp), Err(CheckpointError::Corrupt { .. })));
    store
        .save(4, vec![file("model.bin", &[4; 64])], json!(null))
        .unwrap();
    assert!(!tmp.exists(), "the dead process's folder is removed");
}

#[test]
fn every_checkpoint_corrupt_is_an_error() {
    let store = Checkpoints::new(fresh_dir("all-corrupt"));
    let only = store.save(1, vec![file("a", b"x")], json!({})).unwrap();
    std::fs::remove_file(only.path().join("manifest.json")).unwrap();
    match store.latest() {
        Err(CheckpointError::NoneValid { rejected, .. }) => {
            assert_eq!(rejected.len(), 1);
            assert_eq!(rejected[0].path, only.path());
        }
        other => panic!("expected NoneValid, got {other:?}"),
    }
}

#[test]
fn keeps_the_last_k() {
    let store = Checkpoints::new(fresh_dir("keep")).keep(2);
    for step in 1..=5 {
        store
            .save(step, vec![file("a", &[step as u8])], json!(step))
            .unwrap();
    }
    assert_eq!(
        names_under(store.root()),
        ["step-0000000004", "step-0000000005"]
    );
    let default = Checkpoints::new(fresh_dir("keep-default"));
    for step in [10, 20, 30, 40] {
        default
            .save(step, vec![file("a", b"x")], json!(null))
            .unwrap();
    }
    assert_eq!(
        names_under(default.root()),
        ["step-0000000020", "step-0000000030", "step-0000000040"]
    );
}

#[test]
fn incomplete_checkpoints_do_not_count_toward_k() {
    let store = Checkpoints::new(fresh_dir("keep-complete")).keep(2);
    store.save(1, vec![file("a", b"1")], json!(null)).unwrap();
    store.save(2, vec![file("a", b"2")], json!(null)).unwrap();
    let three = store.save(3, vec![file("a", b"3")], json!(null)).unwrap();
    std::fs::remove_file(three.path().join("manifest.json")).unwrap();
    store.save(4, vec![file("a", b"4")], json!(null)).unwrap();
    // 4 and 2 are the last two complete ones; 3 stays until a complete one is older.
    assert_eq!(
        names_under(store.root()),
        ["step-0000000002", "step-0000000003", "step-0000000004"]
    );
}

#[test]
fn same_step_is_replaced() {
    let store = Checkpoints::new(fresh_dir("replace"));
    store.save(5, vec![file("a", b"old")], json!(1)).unwrap();
    store.save(5, vec![file("a", b"new!")], json!(2)).unwrap();
    assert_eq!(names_under(store.root()), ["step-0000000005"]);
    let found = store.latest().unwrap().unwrap();
    assert_eq!(found.checkpoint.read("a").unwrap(), b"new!");
    assert_eq!(found.checkpoint.meta(), &json!(2));
}

#[test]
fn checkpoint_moved_aside_by_a_killed_save_is_found_and_restored() {
    let store = Checkpoints::new(fresh_dir("aside"));
    let five = store
        .save(5, vec![file("a", b"five")], json!(null))
        .unwrap();
    // Killed between moving step 5 aside and renaming its replacement into place.
    let aside = store.root().join(".step-0000000005.old-999999999");
    std::fs::rename(five.path(), &aside).unwrap();
    let tmp = store.root().join(".step-0000000005.tmp-999999999");
    std::fs::create_dir(&tmp).unwrap();
    assert_latest(
        &store,
        &aside,
        &[(&tmp, "temporary folder: the save did not finish")],
    );
    store.save(6, vec![file("a", b"six")], json!(null)).unwrap();
    assert_eq!(
        names_under(store.root()),
        ["step-0000000005", "step-0000000006"]
    );
}

#[test]
fn writer_contents_and_a_failing_writer() {
    let store = Checkpoints::new(fresh_dir("writer"));
    let w = Contents::writer(|out| out.write_all(b"streamed"));
    let saved = store
        .save(1, vec![("w.bin".into(), w)], json!(null))
        .unwrap();
    assert_eq!(saved.files()[0].size, 8);
    let failing = Contents::writer(|out| {
        out.write_all(b"partial")?;
        Err(std::io::Error::other("disk full"))
    });
    let err = store
        .save(2, vec![("w.bin".into(), failing)], json!(null))
        .unwrap_err();
    assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
    assert_eq!(names_under(store.root()), ["step-0000000001"]);
    assert_latest(&store, saved.path(), &[]);
}

#[test]
fn invalid_names_are_refused() {
    let store = Checkpoints::new(fresh_dir("names"));
    for files in [
        vec![file("manifest.json", b"")],
        vec![file("a/b", b"")],
        vec![file("..", b"")],
        vec![file("", b"")],
        vec![file("a", b""), file("a", b"")],
    ] {
        let err = store.save(1, files, json!(null)).unwrap_err();
        assert!(matches!(err, CheckpointError::InvalidName { .. }), "{err}");
    }
    assert!(store.latest().unwrap().is_none());
}

/// A tensor file changed since the checkpoint was verified is refused when it is read in a
/// stream, even when the changed bytes still decode.
#[test]
fn a_tensor_file_changed_after_verification_is_refused() {
    let store = Checkpoints::new(fresh_dir("changed"));
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    let bytes = encode_safetensors(&[("t", &t)]).unwrap();
    let saved = store
        .save(1, vec![file("t.safetensors", &bytes)], json!({}))
        .unwrap();
    let read = super::run::read_tensors(&saved, "t.safetensors").unwrap();
    assert_eq!(read.len(), 1);
    assert!(read[0].1.equal(&t));

    let mut changed = bytes.clone();
    *changed.last_mut().unwrap() ^= 1; // a bit of the last float
    assert!(decode_safetensors(&changed).is_ok(), "still decodes");
    std::fs::write(saved.path().join("t.safetensors"), &changed).unwrap();
    match super::run::read_tensors(&saved, "t.safetensors") {
        Err(CheckpointError::Corrupt { reason, .. }) => {
            assert!(reason.contains("SHA-256 mismatch"), "{reason}")
        }
        other => panic!("not refused: {:?}", other.map(|t| t.len())),
    }
    std::fs::write(saved.path().join("t.safetensors"), &changed[1..]).unwrap();
    assert!(matches!(
        super::run::read_tensors(&saved, "t.safetensors"),
        Err(CheckpointError::Corrupt { .. })
    ));
}
