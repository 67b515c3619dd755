//! Loading a set from a directory: which files, in which order, as text only.

use super::*;

#[test]
fn empty_set_answers_absent() {
    let s = PolicySet::empty();
    assert_eq!(s.generation(), 0);
    assert!(s.files().is_empty() && s.hooks().is_empty());
    assert_eq!(s.request_hash(5, 512), HookOutcome::Absent);
    assert_eq!(s.vnode_hash(5, 1, 512), HookOutcome::Absent);
    assert_eq!(s.request_key(&req("", NO_HEADERS)), HookOutcome::Absent);
    assert_eq!(s.health("s1", &probe(Some(200), 1.0)), HookOutcome::Absent);
    assert_eq!(s.stats().total_calls(), 0);
}

#[test]
fn missing_dir_is_an_empty_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = PolicySet::load_dir(&dir.path().join("nope"), PolicyLimits::default(), 7)
        .expect("missing dir loads");
    assert_eq!(s.generation(), 7);
    assert!(s.files().is_empty());
    assert_eq!(s.request_hash(1, 8), HookOutcome::Absent);
}

#[test]
fn files_load_in_name_order_and_later_names_override() {
    let s = set(&[
        ("b.lua", "function request_hash(i, slots) return 2 end"),
        (
            "a.lua",
            "function request_hash(i, slots) return 1 end  shared = 'a'",
        ),
        (
            "c.lua",
            "assert(shared == 'a')  function health() return true end",
        ),
        ("notes.txt", "this is not lua"),
        ("d.lua.bak", "error('not loaded')"),
        (".#e.lua", "error('editor lock file, not loaded')"),
    ]);
    assert_eq!(s.files(), vec!["a.lua", "b.lua", "c.lua"]);
    assert_eq!(s.hooks(), vec!["request_hash", "health"]);
    assert!(s.has_hook(Hook::RequestHash) && !s.has_hook(Hook::VnodeHash));
    assert_eq!(s.request_hash(9, 512), HookOutcome::Value(2));
}

#[test]
fn subdirectories_are_not_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("examples")).expect("mkdir");
    fs::create_dir(dir.path().join("dir.lua")).expect("mkdir");
    fs::write(
        dir.path().join("examples/x.lua"),
        "function request_hash() return 3 end",
    )
    .expect("write");
    let s = PolicySet::load_dir(dir.path(), PolicyLimits::default(), 1).expect("loads");
    assert!(s.files().is_empty());
    assert_eq!(s.request_hash(1, 8), HookOutcome::Absent);
}

#[test]
fn bytecode_file_is_rejected() {
    // A Lua 5.4 binary chunk starts with "\x1bLua"; the NUL-free prefix is valid UTF-8.
    let err =
        try_set(&[("bin.lua", "\x1bLuaT\u{19}")], PolicyLimits::default()).expect_err("rejected");
    assert!(err.to_string().contains("bin.lua"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join("bin.lua"),
        b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\xff",
    )
    .expect("write");
    let err = PolicySet::load_dir(dir.path(), PolicyLimits::default(), 1).expect_err("rejected");
    assert!(matches!(err, PolicyError::NotText { .. }), "{err:?}");
}

#[test]
fn examples_directory_is_not_loaded_from_policies() {
    let s = PolicySet::load_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        PolicyLimits::default(),
        1,
    )
    .expect("policies/ loads");
    assert!(
        s.hooks().is_empty(),
        "examples must be copied up to be active"
    );
}
