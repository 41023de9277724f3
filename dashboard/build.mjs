// Builds the dashboard into dist/: dist/index.html and dist/assets/{app.js,app.css}.
// Deterministic (no hashes, no timestamps, no source maps); exits non-zero on failure.
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(fileURLToPath(import.meta.url));
const dist = join(root, "dist");
const assets = join(dist, "assets");

const common = {
  absWorkingDir: root,
  bundle: true,
  minify: true,
  sourcemap: false,
  target: "es2020",
  legalComments: "none",
  logLevel: "warning",
  charset: "utf8",
};

try {
  await rm(dist, { recursive: true, force: true });
  await mkdir(assets, { recursive: true });
  await build({
    ...common,
    entryPoints: ["src/main.ts"],
    outfile: join(assets, "app.js"),
    format: "esm",
    platform: "browser",
  });
  await build({
    ...common,
    entryPoints: ["src/style.css"],
    outfile: join(assets, "app.css"),
    // xterm's CSS has no url() assets today; anything that appears is inlined.
    loader: { ".woff": "dataurl", ".woff2": "dataurl", ".png": "dataurl", ".svg": "dataurl" },
  });
  await copyFile(join(root, "src", "index.html"), join(dist, "index.html"));
  console.log("dashboard built: dist/index.html, dist/assets/app.js, dist/assets/app.css");
} catch (e) {
  console.error(`dashboard build failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exit(1);
}
