//! The dashboard page: plain HTML, CSS and JavaScript in `src/http/assets/`,
//! embedded in the binary (no build step, nothing fetched at build time).
//! Served with an ETag (a hash of the content) and `Cache-Control: no-cache`,
//! so a browser revalidates and gets `304 Not Modified` until the binary
//! changes, and with a Content-Security-Policy that allows only this origin's
//! own script and style (the page has no inline script, and puts data into
//! the DOM as text only).

use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    etag: HeaderValue,
}

impl Asset {
    fn new(content_type: &'static str, body: &'static [u8]) -> Asset {
        let digest = Sha256::digest(body);
        let etag = format!("\"{}\"", hex::encode(&digest[..12]));
        Asset {
            content_type,
            body,
            etag: HeaderValue::from_str(&etag).expect("hex is a valid header value"),
        }
    }

    fn respond(&self, headers: &HeaderMap) -> Response {
        let fresh = headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|tags| tags.as_bytes() == self.etag.as_bytes());
        let common = [
            (header::ETAG, self.etag.clone()),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
        ];
        if fresh {
            return (StatusCode::NOT_MODIFIED, common).into_response();
        }
        (
            common,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            )],
            self.body,
        )
            .into_response()
    }
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/html; charset=utf-8",
        include_bytes!("assets/index.html"),
    )
});
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/javascript; charset=utf-8",
        include_bytes!("assets/app.js"),
    )
});
static STYLE: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("text/css; charset=utf-8", include_bytes!("assets/app.css")));
static ICON: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("image/svg+xml", include_bytes!("assets/favicon.svg")));

/// `/` and `/index.html` (the page), `/app.js`, `/app.css`, `/favicon.svg`.
pub fn routes() -> Router {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { INDEX.respond(&h) }))
        .route(
            "/index.html",
            get(|h: HeaderMap| async move { INDEX.respond(&h) }),
        )
        .route(
            "/app.js",
            get(|h: HeaderMap| async move { SCRIPT.respond(&h) }),
        )
        .route(
            "/app.css",
            get(|h: HeaderMap| async move { STYLE.respond(&h) }),
        )
        .route(
            "/favicon.svg",
            get(|h: HeaderMap| async move { ICON.respond(&h) }),
        )
}
