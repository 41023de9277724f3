// A preview fetched through its URL from the host: an HTTP server in the sandbox, its
// signed URL, the application-proxy target, a public port, and the redaction helpers.
import assert from "node:assert/strict";
import { test } from "node:test";

import { PREVIEW_PROXY_HEADER, Sandbox, redactPreviewToken, redactPreviewUrl } from "nullspace";

import { RUN, SMALL, fetchUrl, until } from "./lib.mjs";

test("a preview URL serves the sandbox's port; tokens guard it", async () => {
  const sbx = await Sandbox.create("base", { resources: SMALL, timeout: 300, metadata: { run: RUN } });
  try {
    const marker = `preview-ok-${process.pid}`;
    await sbx.files.write("site/index.html", `<h1>${marker}</h1>`);
    await sbx.commands.run("python3 -m http.server 8000 --directory /workspace/site", { background: true });

    const preview = await sbx.getPreviewUrl(8000);
    assert.equal(preview.port, 8000);
    assert.equal(preview.public, false);
    assert.equal(preview.host, await sbx.getHost(8000));
    assert.ok(preview.host.startsWith(`8000-${sbx.sandboxId}.`), preview.host);
    assert.ok(preview.url.startsWith(`http://${preview.host}/?ns_preview_token=`), preview.url);

    // Through its URL, as a browser would open it (the server may still be starting).
    const page = await until("the preview page", async () => {
      const r = await fetchUrl(preview.url);
      return r.status === 200 ? r : null;
    });
    assert.ok(page.body.includes(marker), page.body);
    // The token in the URL was traded for a cookie and dropped from the address.
    assert.equal(page.hops[0].status, 302);
    assert.equal(page.hops[0].headers.location, "/");
    assert.match(page.hops[0].headers["set-cookie"][0], /^ns_preview_8000=.*HttpOnly/);

    // Without the token the port is private; a forged one is refused too.
    assert.equal((await fetchUrl(`http://${preview.host}/`)).status, 401);
    assert.equal((await fetchUrl(`http://${preview.host}/?ns_preview_token=forged`)).status, 401);

    // The application-proxy target: the token in a header instead of the URL.
    const target = await sbx.createPreviewProxyTarget(8000);
    assert.equal(target.header, PREVIEW_PROXY_HEADER);
    assert.equal(target.url, `http://${preview.host}/`);
    const proxied = await fetchUrl(target.url, { [target.header]: target.token });
    assert.equal(proxied.status, 200);
    assert.ok(proxied.body.includes(marker));

    // Redaction before logging.
    const red = redactPreviewUrl(preview.url);
    assert.ok(!red.includes(preview.token) && red.endsWith("ns_preview_token=REDACTED"), red);
    assert.ok(!redactPreviewToken(preview.token).includes(preview.token));

    // A public port needs no token; private again, it does.
    assert.equal((await sbx.setPortPublic(8000)).public, true);
    const open = await fetchUrl(`http://${preview.host}/`);
    assert.equal(open.status, 200);
    assert.ok(open.body.includes(marker));
    assert.equal((await sbx.setPortPublic(8000, false)).public, false);
    assert.equal((await fetchUrl(`http://${preview.host}/`)).status, 401);
  } finally {
    await sbx.kill();
  }
});
