//! The guest image build: cached by content, and a failed step leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn agent_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let agent = target.join("x86_64-unknown-linux-gnu/release/nullspace-agent");
    assert!(
        agent.is_file(),
        "build the agent first (deploy/build.sh): {}",
        agent.display()
    );
    agent
}

#[test]
fn an_unchanged_build_is_served_from_the_cache() {
    let run = || {
        Command::new(repo().join("deploy/guest-image/build.sh"))
            .arg(agent_binary())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = run();
    assert!(second.status.success());
    assert_eq!(first.stdout, second.stdout, "same inputs, same image set");
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(
        !log.contains("building") && !log.contains("composing"),
        "a second run rebuilt something:\n{log}"
    );
    let set = PathBuf::from(String::from_utf8_lossy(&second.stdout).trim());
    for file in [
        "vmlinuz",
        "initrd.img",
        "minimal.ext4",
        "base.ext4",
        "manifest.json",
    ] {
        assert!(
            set.join(file).is_file(),
            "{file} missing in {}",
            set.display()
        );
    }
}

#[test]
fn a_failed_step_is_named_and_leaves_nothing_in_the_cache() {
    let scratch = std::env::temp_dir().join(format!("image-fail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let bin = scratch.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // A failing mmdebstrap, first on PATH: the base tree step breaks after the kernel
    // layer was built.
    let fake = bin.join("mmdebstrap");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'simulated mirror failure' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cache = scratch.join("cache");
    let out = Command::new(repo().join("deploy/guest-image/build.sh"))
        .arg(agent_binary())
        .env("NULLSPACE_CACHE", &cache)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("FAILED at step: mmdebstrap bookworm"), "{log}");
    let left: Vec<String> = std::fs::read_dir(cache.join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // The finished kernel layer stays (it is complete); nothing half-written does.
    assert!(left.iter().all(|n| n.starts_with("kernel-")), "{left:?}");
    std::fs::remove_dir_all(&scratch).unwrap();
}
