//! Embeds the web dashboard (`dashboard/dist`, built by deploy/build-dashboard.sh) into
//! the component: the public API's origin serves it under `/dashboard/`, so one `.wasm`
//! carries API and dashboard to every host that runs it (ours, Spin, `wasmtime serve`),
//! and nothing is fetched from elsewhere at run time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let dist = std::env::var_os("NULLSPACE_DASHBOARD_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
                .join("../dashboard/dist")
        });
    println!("cargo:rerun-if-env-changed=NULLSPACE_DASHBOARD_DIST");
    println!("cargo:rerun-if-changed={}", dist.display());
    let assets_dir = dist.join("assets");
    println!("cargo:rerun-if-changed={}", assets_dir.display());
    let index = dist.join("index.html");
    if !index.is_file() || !assets_dir.is_dir() {
        panic!(
            "the dashboard is not built ({} has no index.html and assets/): run deploy/build-dashboard.sh (deploy/build-component.sh runs it first), or point NULLSPACE_DASHBOARD_DIST at a built dist/",
            dist.display()
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(&assets_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", assets_dir.display()))
        .map(|entry| {
            let entry = entry.unwrap_or_else(|e| panic!("reading {}: {e}", assets_dir.display()));
            entry.file_name().into_string().unwrap_or_else(|n| {
                panic!("{}: asset names must be UTF-8: {n:?}", assets_dir.display())
            })
        })
        .collect();
    names.sort();
    let mut out = String::from(
        "/// The dashboard's assets: name under `/dashboard/assets/`, content type, bytes.\n",
    );
    out.push_str("pub static ASSETS: &[(&str, &str, &[u8])] = &[\n");
    for name in &names {
        let path = assets_dir.join(name);
        println!("cargo:rerun-if-changed={}", path.display());
        let kind = content_type(name).unwrap_or_else(|| {
            panic!("{}: no content type for this kind of file; name it .js, .css, .svg, .png, .woff2 or .json", path.display())
        });
        let abs = path.canonicalize().expect("listed just now");
        writeln!(
            out,
            "    ({name:?}, {kind:?}, include_bytes!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    println!("cargo:rerun-if-changed={}", index.display());
    let abs = index.canonicalize().expect("checked above");
    writeln!(out, "/// The page every other `/dashboard/` path answers with (the app routes itself).\npub static INDEX: &[u8] = include_bytes!({:?});", abs.display().to_string()).unwrap();
    let target =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets it")).join("dashboard_assets.rs");
    std::fs::write(&target, out).unwrap_or_else(|e| panic!("writing {}: {e}", target.display()));
}

fn content_type(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1;
    Some(match ext {
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "woff2" => "font/woff2",
        "json" => "application/json",
        _ => return None,
    })
}
