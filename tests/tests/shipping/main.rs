//! Shipping: the container images and the Terraform module. No container
//! engine and no Terraform run on the build machines, so the tests do what
//! can be done here: run each Dockerfile's own `cargo build` line and check
//! the binary it copies into a distroless image, and check the Terraform
//! code with HashiCorp's formatter and parser (scripts/terraform-check.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cirrus_e2e::k8s::{cargo_as_from_a_shell, run, workspace_root};

/// The stages of a Dockerfile: (FROM line, instructions).
fn stages(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(from) = line.strip_prefix("FROM ") {
            out.push((from.to_string(), Vec::new()));
        } else if let Some(s) = out.last_mut() {
            s.1.push(line.to_string());
        }
    }
    out
}

/// Shared libraries a binary needs, by `ldd`.
fn needed_libs(bin: &Path) -> Vec<String> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|l| l.rsplit('/').next().unwrap_or(l).to_string())
        .collect()
}

fn check_dockerfile(dockerfile: &str, binary: &str) {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join(dockerfile)).unwrap();
    let st = stages(&text);
    assert_eq!(
        st.len(),
        2,
        "{dockerfile}: a build stage and a runtime stage"
    );
    let (build_from, build) = &st[0];
    assert!(build_from.starts_with("docker.io/library/rust:") && build_from.ends_with(" AS build"));
    let (run_from, runtime) = &st[1];
    assert!(
        run_from.starts_with("gcr.io/distroless/"),
        "{dockerfile}: runtime image {run_from}"
    );
    assert!(runtime.iter().any(|l| l == "USER 65532:65532"), "non-root");
    let copy = runtime
        .iter()
        .find(|l| l.starts_with("COPY --from=build "))
        .expect("COPY --from=build");
    let src = copy.split_whitespace().nth(2).unwrap();
    let rel = src
        .strip_prefix("/src/")
        .expect("copied from the build's /src");
    let entry = runtime
        .iter()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .unwrap();
    let dest = copy.split_whitespace().nth(3).unwrap();
    assert!(entry.contains(dest), "{entry} runs {dest}");

    // The build stage's command, exactly as written, in this checkout.
    let cmd = build
        .iter()
        .find_map(|l| l.strip_prefix("RUN cargo build "))
        .expect("RUN cargo build");
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let mut all = vec!["build"];
    all.extend(&args);
    // As from a shell: the cluster's image build (scripts/k8s-cluster.sh)
    // then finds these binaries built, not stale.
    let (ok, _, err) = cargo_as_from_a_shell(&all, Duration::from_secs(1500));
    assert!(ok, "{dockerfile}: cargo build {cmd} failed:\n{err}");
    let bin: PathBuf = root.join(rel);
    assert!(bin.exists(), "{} was not built", bin.display());
    assert!(bin.ends_with(binary));
    let (ok, out, _) = run(&bin, &["--version"], &[], Duration::from_secs(10));
    assert!(ok && out.starts_with(binary), "{out}");
    // Distroless cc-debian12 has glibc (libc, libm, the loader) and libgcc,
    // nothing else: the binary must need nothing more.
    let allowed = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
    ];
    for lib in needed_libs(&bin) {
        assert!(
            allowed.contains(&lib.as_str()),
            "{binary} needs {lib}, which distroless/cc lacks"
        );
    }
}

#[test]
fn docker_broker_image_builds_the_binary_it_copies() {
    check_dockerfile("broker/Dockerfile", "cirrus-broker");
}

#[test]
fn docker_operator_image_builds_the_binary_it_copies() {
    check_dockerfile("operator/Dockerfile", "cirrus-operator");
}

#[test]
fn terraform_is_formatted_and_parses() {
    let (ok, out, err) = run(
        Path::new("/bin/bash"),
        &["scripts/terraform-check.sh"],
        &[],
        Duration::from_secs(300),
    );
    assert!(ok, "terraform check failed:\n{out}{err}");
    assert!(out.contains("0 with problems"), "{out}");
    // The module's documented inputs and outputs exist.
    let m = workspace_root().join("terraform/modules/cirrus");
    let vars = std::fs::read_to_string(m.join("variables.tf")).unwrap();
    for v in [
        "namespace",
        "operator_image",
        "replicas",
        "autoscaling",
        "redis",
        "tls",
        "users",
    ] {
        assert!(vars.contains(&format!("variable \"{v}\"")), "input {v}");
    }
    let outs = std::fs::read_to_string(m.join("outputs.tf")).unwrap();
    for o in ["endpoints", "user_secrets"] {
        assert!(outs.contains(&format!("output \"{o}\"")), "output {o}");
    }
}
