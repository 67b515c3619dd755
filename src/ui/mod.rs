//! The operator page, `GET /lb/`: one HTML page, its script, its style sheet and its icon,
//! compiled into the binary.
//!
//! Owns: the page's assets (`index.html`, `app.js`, `app.css`, `favicon.svg` beside this file:
//! plain HTML, CSS and JavaScript with SVG, no build step, no external resource) and the
//! headers they are served with (a Content-Security-Policy that allows only this origin, no
//! framing, no sniffing, no caching of a stale page). The page reads `/lb/status` once a second
//! and posts to `/lb/simulate`; it holds no state of the gateway's.
//! Must not touch: the guard (`admin` applies it to these paths like to `/lb/status`) or any
//! gateway state.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::answer::full;
use crate::wire::body::Body;

/// The page's files: path under `/lb/`, content type, bytes.
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "/lb/",
        "text/html; charset=utf-8",
        include_str!("index.html"),
    ),
    (
        "/lb/app.js",
        "text/javascript; charset=utf-8",
        include_str!("app.js"),
    ),
    (
        "/lb/app.css",
        "text/css; charset=utf-8",
        include_str!("app.css"),
    ),
    (
        "/lb/favicon.svg",
        "image/svg+xml",
        include_str!("favicon.svg"),
    ),
];

/// Only this origin, for everything; no plugins, no framing (clickjacking), forms post here only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Whether `path` is one of the page's files.
pub fn is_asset(path: &str) -> bool {
    ASSETS.iter().any(|(p, _, _)| *p == path)
}

/// Total size of the page's files, in bytes (what a first load transfers, uncompressed).
#[cfg(test)]
fn payload_bytes() -> usize {
    ASSETS.iter().map(|(_, _, body)| body.len()).sum()
}

/// The file at `path`, or `None` when it is not one of the page's.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (_, content_type, body) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    let mut resp = Response::new(full(*body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(resp)
}

/// `/lb` → `/lb/`, so the page's relative links resolve under `/lb/`.
pub fn redirect_to_page() -> Response<Body> {
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/lb/"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_uses_only_its_own_files() {
        let html = include_str!("index.html");
        for (path, _, _) in &ASSETS[1..] {
            let name = path.trim_start_matches("/lb/");
            assert!(
                html.contains(&format!("\"{name}\"")),
                "index.html links {name}"
            );
        }
        for (_, _, body) in ASSETS {
            for external in ["http://", "https://", "//cdn", "@import", "url("] {
                let allowed = external == "http://" && body.contains("http://www.w3.org/2000/svg");
                assert!(
                    allowed || !body.contains(external),
                    "an external resource ({external}) in the page"
                );
            }
        }
    }

    #[test]
    fn assets_carry_their_type_and_a_strict_policy() {
        let resp = asset("/lb/app.js").expect("app.js");
        let h = resp.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert!(h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .is_ok_and(|c| c.contains("frame-ancestors 'none'")));
        assert!(asset("/lb/nope.js").is_none());
        assert!(is_asset("/lb/") && !is_asset("/lb/status"));
        assert!(payload_bytes() > 1000);
    }

    #[test]
    fn the_script_never_puts_gateway_text_in_as_markup() {
        let js = include_str!("app.js");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!js.contains(sink), "app.js uses {sink}");
        }
    }
}
