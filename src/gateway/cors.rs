//! The Origin allow-list (`--allowed-origin`) on the plain HTTP endpoints, and CORS for the
//! publish API (the Fetch standard's CORS protocol).
//!
//! A browser names the page that made a request in `Origin`. With an allow-list configured, a
//! request from a page not on it is refused (403) on every endpoint, as its WebSocket upgrade is;
//! a page on it may publish and read the answer: the answer names that exact origin in
//! `Access-Control-Allow-Origin` (never `*`), and preflights (`OPTIONS` with
//! `Access-Control-Request-Method`) are answered. Without an allow-list every origin may send, as
//! before, but no CORS header is sent, so no page can read an answer or pass a preflight (and so
//! cannot send the `Authorization` a publish key needs). Requests without `Origin` do not come from
//! a browser's cross-origin fetch and are not judged. Must never: answer `*`, or allow an origin
//! the WebSocket upgrade would refuse.

use crate::proto::handshake::origin_listed;

/// How long a browser may cache a preflight's answer, in seconds (browsers cap it: Chromium at
/// two hours): ten minutes keeps an allow-list change from taking long to reach open pages.
pub const PREFLIGHT_MAX_AGE: &str = "600";

/// Methods and request headers a page may use on the publish API, as preflights are told.
pub const ALLOWED_METHODS: &str = "POST";
/// See [`ALLOWED_METHODS`].
pub const ALLOWED_HEADERS: &str = "Authorization, Content-Type";

/// What the allow-list says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginCheck<'b> {
    /// An allow-list is configured, so the answer depends on `Origin` (`Vary: Origin`).
    pub listed: bool,
    /// The request's `Origin`, when it is on the allow-list: CORS headers name it.
    pub allowed: Option<&'b str>,
}

/// A request from a page the allow-list does not name: 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForbiddenOrigin;

/// Judges a request's `Origin` (`None`: no such header) against `allow_list` (empty: no list).
pub fn check_origin<'b>(
    allow_list: &[String],
    origin: Option<&'b str>,
) -> Result<OriginCheck<'b>, ForbiddenOrigin> {
    let listed = !allow_list.is_empty();
    match origin {
        Some(origin) if listed => {
            if origin_listed(allow_list, origin) {
                Ok(OriginCheck { listed, allowed: Some(origin) })
            } else {
                Err(ForbiddenOrigin)
            }
        }
        _ => Ok(OriginCheck { listed, allowed: None }),
    }
}

impl<'b> OriginCheck<'b> {
    /// The headers every answer to this request carries: `Vary: Origin` under an allow-list, and
    /// `Access-Control-Allow-Origin` when `cors` (the publish API) and the origin is allowed.
    pub fn headers(&self, cors: bool, out: &mut Vec<(&'static str, &'b str)>) {
        if let Some(origin) = self.allowed.filter(|_| cors) {
            out.push(("Access-Control-Allow-Origin", origin));
        }
        if self.listed {
            out.push(("Vary", "Origin"));
        }
    }

    /// The preflight headers for an allowed origin (with [`OriginCheck::headers`]); none otherwise,
    /// which a browser reads as a refusal.
    pub fn preflight_headers(&self, out: &mut Vec<(&'static str, &'b str)>) {
        if self.allowed.is_some() {
            out.push(("Access-Control-Allow-Methods", ALLOWED_METHODS));
            out.push(("Access-Control-Allow-Headers", ALLOWED_HEADERS));
            out.push(("Access-Control-Max-Age", PREFLIGHT_MAX_AGE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Vec<String> {
        vec!["https://app.example".into()]
    }

    #[test]
    fn without_a_list_every_origin_passes_and_gets_no_cors_header() {
        let check = check_origin(&[], Some("http://evil.example")).expect("open");
        let mut headers = Vec::new();
        check.headers(true, &mut headers);
        check.preflight_headers(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn a_listed_origin_is_named_exactly_and_others_are_refused() {
        let check = check_origin(&list(), Some("https://app.example")).expect("listed");
        let mut headers = Vec::new();
        check.headers(true, &mut headers);
        assert_eq!(headers, [("Access-Control-Allow-Origin", "https://app.example"), ("Vary", "Origin")]);
        assert_eq!(check_origin(&list(), Some("http://evil.example")), Err(ForbiddenOrigin));
        assert_eq!(check_origin(&list(), Some("https://app.example.evil")), Err(ForbiddenOrigin));
        assert_eq!(check_origin(&list(), Some("null")), Err(ForbiddenOrigin));
    }

    #[test]
    fn requests_without_origin_are_served_but_still_vary() {
        let check = check_origin(&list(), None).expect("not a browser's cross-origin request");
        let mut headers = Vec::new();
        check.headers(true, &mut headers);
        check.preflight_headers(&mut headers);
        assert_eq!(headers, [("Vary", "Origin")]);
    }
}
