//! The pages and their assets, embedded in the binary: no request ever
//! leaves the page's origin.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// Every embedded asset: file name, content type, content.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("index.html", HTML, include_str!("../assets/index.html")),
    ("private.html", HTML, include_str!("../assets/private.html")),
    ("public.html", HTML, include_str!("../assets/public.html")),
    ("app.css", CSS, include_str!("../assets/app.css")),
    ("pingapp.js", JS, include_str!("../assets/pingapp.js")),
    ("connection.js", JS, include_str!("../assets/connection.js")),
    ("stats.js", JS, include_str!("../assets/stats.js")),
    ("chart.js", JS, include_str!("../assets/chart.js")),
    ("roster.js", JS, include_str!("../assets/roster.js")),
    ("view.js", JS, include_str!("../assets/view.js")),
    ("history.js", JS, include_str!("../assets/history.js")),
    ("device.js", JS, include_str!("../assets/device.js")),
];

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// The page routes: `/`, `/private/`, `/public/` and `/static/{file}`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { asset("index.html") }))
        .route("/private/", get(|| async { asset("private.html") }))
        .route("/public/", get(|| async { asset("public.html") }))
        .route(
            "/private",
            get(|| async { Redirect::permanent("/private/") }),
        )
        .route("/public", get(|| async { Redirect::permanent("/public/") }))
        .route(
            "/static/{file}",
            get(|Path(file): Path<String>| async move { asset(&file) }),
        )
}

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

/// Headers on every response: cross-origin isolation (so
/// `performance.now()` is as fine as the browser allows), a content
/// security policy that keeps every request on this origin, and no
/// sniffing.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-embedder-policy", "require-corp"),
    ("cross-origin-resource-policy", "same-origin"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'self'; img-src 'self' data:; connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_assets_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets");
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                ASSETS.iter().any(|(n, _, _)| *n == name),
                "gateway/assets/{name} is not embedded in pages::ASSETS"
            );
        }
    }

    #[test]
    fn pages_load_nothing_from_other_origins() {
        for (name, _, body) in ASSETS {
            for needle in ["http://", "https://", "//cdn", "<script>"] {
                if needle == "<script>" && !name.ends_with(".html") {
                    continue;
                }
                assert!(!body.contains(needle), "{name} contains {needle}");
            }
        }
    }
}
