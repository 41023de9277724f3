//! `componentize CORE.wasm OUT.wasm`: wraps a wasm32-wasip1 core module into a component
//! using the `wasi_snapshot_preview1` proxy adapter, so it imports only what a strict
//! wasi:http proxy-world host provides, and the wasi:cli/environment the API component
//! imports itself (Spin, `wasmtime serve -Scli`, our api-host give it).

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        anyhow::bail!("usage: componentize CORE.wasm OUT.wasm");
    };
    let module = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .context("not a core wasm module")?
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER,
        )?
        .validate(true)
        .encode()
        .context("encoding the component")?;
    std::fs::write(output, component).with_context(|| format!("writing {output}"))?;
    Ok(())
}
