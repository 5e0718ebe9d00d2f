//! The console's stylesheet and script, compiled into the binary (no CDN, no files to deploy).
//! URLs carry a content hash, so browsers may cache them for a year and still never run a stale
//! script after an upgrade.

use std::sync::OnceLock;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use sha2::{Digest, Sha256};

const CSS: &str = include_str!("../../static/console.css");
const JS: &str = include_str!("../../static/console.js");

struct Asset {
    name: &'static str,
    body: &'static str,
    content_type: &'static str,
    /// Hex prefix of the SHA-256 of `body`: the cache-busting query and the ETag.
    hash: String,
}

fn assets() -> &'static [Asset; 2] {
    static ASSETS: OnceLock<[Asset; 2]> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let hash = |body: &str| hex::encode(&Sha256::digest(body.as_bytes())[..8]);
        [
            Asset {
                name: "console.css",
                body: CSS,
                content_type: "text/css; charset=utf-8",
                hash: hash(CSS),
            },
            Asset {
                name: "console.js",
                body: JS,
                content_type: "text/javascript; charset=utf-8",
                hash: hash(JS),
            },
        ]
    })
}

fn url_of(name: &str) -> String {
    let hash = assets()
        .iter()
        .find(|a| a.name == name)
        .map_or("", |a| a.hash.as_str());
    format!("/console/static/{name}?v={hash}")
}

/// The versioned URL of the stylesheet.
pub fn css_url() -> String {
    url_of("console.css")
}

/// The versioned URL of the script.
pub fn js_url() -> String {
    url_of("console.js")
}

/// `GET /console/static/{name}`.
pub async fn serve(req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    let Some(asset) = assets().iter().find(|a| a.name == name.as_str()) else {
        return HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("no such asset");
    };
    let etag = format!("\"{}\"", asset.hash);
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if fresh {
        response.finish()
    } else {
        response.content_type(asset.content_type).body(asset.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_urls_change_with_their_content_hash() {
        let css = css_url();
        assert!(css.starts_with("/console/static/console.css?v="));
        assert_eq!(css.len(), "/console/static/console.css?v=".len() + 16);
        assert_ne!(css_url().rsplit('=').next(), js_url().rsplit('=').next());
    }
}
