//! The web dashboard's static files, served under `/dashboard/` by the public API's own
//! origin (so its calls to `/api/v1` are same-origin and need no CORS). Built into the
//! component (build.rs embeds `dashboard/dist`); no key is needed to load the page: it
//! signs in with an API key the user types, kept in the tab's session storage.

use spin_sdk::http::{Method, Response};

include!(concat!(env!("OUT_DIR"), "/dashboard_assets.rs"));

/// The Content-Security-Policy of every dashboard response. Scripts and fonts come from
/// this origin only (no inline script, no eval); the page is never framed. Styles may
/// also be inline: the terminal (xterm.js) sizes its cells and colours with `<style>`
/// elements it makes at run time, and a style cannot run code.
/// `connect-src` and `frame-src` allow http(s) and ws(s) hosts because the data plane
/// (files, terminal, events) and preview URLs (the desktop viewer) are on each worker's
/// own origin, which a stateless component cannot list.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data: blob:; font-src 'self'; connect-src 'self' http: https: ws: wss:; \
    frame-src http: https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The answer to `path` (which starts with `/dashboard`), or `None` when it is not the
/// dashboard's.
pub fn serve(method: &Method, path: &str) -> Option<Response> {
    let rest = path.strip_prefix("/dashboard")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None; // `/dashboardx`: not ours.
    }
    if *method != Method::Get {
        return Some(plain(
            405,
            "the dashboard's pages are read with GET\n",
            &[("allow", "GET")],
        ));
    }
    if rest.is_empty() {
        return Some(plain(
            308,
            "the dashboard is at /dashboard/\n",
            &[("location", "/dashboard/")],
        ));
    }
    if let Some(name) = rest.strip_prefix("/assets/") {
        return Some(match ASSETS.iter().find(|(n, _, _)| *n == name) {
            Some((_, kind, bytes)) => page(kind, bytes),
            None => plain(
                404,
                "no such dashboard asset; reload the dashboard (/dashboard/)\n",
                &[],
            ),
        });
    }
    Some(page("text/html; charset=utf-8", INDEX))
}

/// A dashboard file with the headers every one carries.
fn page(kind: &str, bytes: &[u8]) -> Response {
    let mut resp = Response::builder();
    resp.status(200)
        .header("content-type", kind)
        .header("content-length", bytes.len().to_string());
    secure(&mut resp);
    resp.body(bytes.to_vec()).build()
}

fn plain(status: u16, text: &str, extra: &[(&str, &str)]) -> Response {
    let mut resp = Response::builder();
    resp.status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("content-length", text.len().to_string());
    for (k, v) in extra {
        resp.header(*k, *v);
    }
    secure(&mut resp);
    resp.body(text.as_bytes().to_vec()).build()
}

/// The security headers of every dashboard answer. `no-cache`: a browser revalidates,
/// so a new build is seen at the next load (the files are small).
fn secure(resp: &mut spin_sdk::http::ResponseBuilder) {
    resp.header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .header("cross-origin-opener-policy", "same-origin")
        .header("cache-control", "no-cache");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(method: Method, path: &str) -> Option<u16> {
        serve(&method, path).map(|r| *r.status())
    }

    #[test]
    fn only_dashboard_paths_are_answered_and_only_embedded_files() {
        assert_eq!(status(Method::Get, "/api/v1/sandboxes"), None);
        assert_eq!(status(Method::Get, "/dashboardx"), None);
        assert_eq!(status(Method::Get, "/dashboard"), Some(308));
        assert_eq!(status(Method::Get, "/dashboard/"), Some(200));
        assert_eq!(status(Method::Get, "/dashboard/sandboxes/sbx-1"), Some(200));
        assert_eq!(status(Method::Post, "/dashboard/"), Some(405));
        assert_eq!(
            status(Method::Get, "/dashboard/assets/../index.html"),
            Some(404)
        );
        assert_eq!(status(Method::Get, "/dashboard/assets/"), Some(404));
        assert!(!ASSETS.is_empty(), "the build embedded no assets");
        for (name, kind, _) in ASSETS {
            let resp = serve(&Method::Get, &format!("/dashboard/assets/{name}")).unwrap();
            assert_eq!(*resp.status(), 200, "{name}");
            assert_eq!(
                resp.header("content-type").and_then(|v| v.as_str()),
                Some(*kind)
            );
            assert_eq!(
                resp.header("content-security-policy")
                    .and_then(|v| v.as_str()),
                Some(CSP)
            );
        }
    }
}
