//! Negotiating permessage-deflate (RFC 7692 section 7.1): reading the client's offers from
//! `Sec-WebSocket-Extensions`, picking the first one this server can honour, and writing the
//! answer.
//!
//! Policy, from the memory budget (see [`Policy`]): the server always answers
//! `server_no_context_takeover` in shared mode (one compressor per worker, reset after every
//! message, serves every connection) and asks `client_no_context_takeover` (so it keeps no
//! decompressor per connection between messages). RFC 7692 lets a server add both to any offer.
//!
//! Must never: fail a handshake over an extension offer (a malformed or unsupported offer is
//! declined and the next one tried; with none left the connection goes on uncompressed), answer
//! with a parameter the offer did not allow (`client_max_window_bits` without the client's
//! consent), or compress with a larger window than the client allowed.

use std::fmt::Write as _;

/// The extension's token.
pub const EXTENSION: &str = "permessage-deflate";

/// What a client of ours offers (the proxy towards an upstream, loadtest): what browsers send, so
/// that the server answers as it would answer them.
pub const CLIENT_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// The smallest window zlib's raw deflate can compress with: it cannot do 2^8, so an offer that
/// limits the server to 8 bits is declined (RFC 7692 section 7.1.2.1 lets the server decline).
pub const MIN_WINDOW_BITS: u8 = 9;
/// The largest window DEFLATE has.
pub const MAX_WINDOW_BITS: u8 = 15;

/// What the server is willing to agree to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Compress each message on its own (`server_no_context_takeover`): the shared mode, where
    /// one compressor serves every connection. `false` keeps a compressor per connection.
    pub server_no_context_takeover: bool,
    /// Ask the client to compress each message on its own (`client_no_context_takeover`), so that
    /// no decompressor is kept per connection between messages.
    pub client_no_context_takeover: bool,
    /// The largest window the server compresses with (9-15).
    pub server_max_window_bits: u8,
}

impl Policy {
    /// The shared mode: no context kept on either side, full window.
    pub const SHARED: Policy = Policy {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        server_max_window_bits: MAX_WINDOW_BITS,
    };
}

/// What was agreed for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    /// The server resets its compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message (so the server may reset its
    /// decompressor too).
    pub client_no_context_takeover: bool,
    /// The window the server compresses with.
    pub server_window_bits: u8,
    /// Whether to name the server's window in the answer (only when the offer named one).
    server_window_bits_named: bool,
    /// The window the client compresses with, when the answer limits it.
    pub client_window_bits: Option<u8>,
}

impl Agreement {
    /// The `Sec-WebSocket-Extensions` value of the answer.
    pub fn response_value(&self) -> String {
        let mut value = String::from(EXTENSION);
        if self.server_no_context_takeover {
            value.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            value.push_str("; client_no_context_takeover");
        }
        if self.server_window_bits_named {
            let _ = write!(value, "; server_max_window_bits={}", self.server_window_bits);
        }
        if let Some(bits) = self.client_window_bits {
            let _ = write!(value, "; client_max_window_bits={bits}");
        }
        value
    }
}

/// The first offer of permessage-deflate in `values` (the `Sec-WebSocket-Extensions` header
/// values, in order) that `policy` can honour, or `None` when there is none (the connection goes
/// on uncompressed).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>, policy: &Policy) -> Option<Agreement> {
    values.into_iter().flat_map(split_list).find_map(|offer| accept(offer, policy))
}

/// Splits a header value into its comma-separated elements, keeping commas inside quoted strings.
fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = value;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut quoted = false;
        let mut end = rest.len();
        for (at, byte) in rest.bytes().enumerate() {
            match byte {
                b'"' => quoted = !quoted,
                b',' if !quoted => {
                    end = at;
                    break;
                }
                _ => {}
            }
        }
        let element = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        Some(element.trim())
    })
    .filter(|element| !element.is_empty())
}

/// One offer's parameters, each at most once (RFC 7692 section 7.1: a repeated parameter makes
/// the offer invalid).
#[derive(Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value.
    client_max_window_bits: Option<Option<u8>>,
}

/// One element's parameters, or `None` when it is not permessage-deflate or is malformed.
fn parse_offer(element: &str) -> Option<Offer> {
    let mut parts = element.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut offer = Offer::default();
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (part, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true;
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true;
            }
            ("server_max_window_bits", Some(value)) if offer.server_max_window_bits.is_none() => {
                offer.server_max_window_bits = Some(window_bits(value)?);
            }
            ("client_max_window_bits", value) if offer.client_max_window_bits.is_none() => {
                let bits = match value {
                    Some(value) => Some(window_bits(value)?),
                    None => None,
                };
                offer.client_max_window_bits = Some(bits);
            }
            // Unknown, repeated or wrongly valued parameters make the offer invalid.
            _ => return None,
        }
    }
    Some(offer)
}

/// The agreement for one offer, or `None` to decline it.
fn accept(element: &str, policy: &Policy) -> Option<Agreement> {
    let offer = parse_offer(element)?;
    let server_window_bits = match offer.server_max_window_bits {
        Some(bits) if bits < MIN_WINDOW_BITS => return None,
        Some(bits) => bits.min(policy.server_max_window_bits),
        None => policy.server_max_window_bits,
    };
    Some(Agreement {
        server_no_context_takeover: offer.server_no_context_takeover || policy.server_no_context_takeover,
        client_no_context_takeover: offer.client_no_context_takeover || policy.client_no_context_takeover,
        server_window_bits,
        // Named when the offer limited it, or when the server uses less than the default 15.
        server_window_bits_named: offer.server_max_window_bits.is_some()
            || server_window_bits < MAX_WINDOW_BITS,
        // The client's window is left as it offered: the server inflates with a full window,
        // which reads any smaller one.
        client_window_bits: None,
    })
}

/// Reads a server's answer to [`CLIENT_OFFER`] (RFC 7692 section 7.1, the client's checks): the
/// agreement, or `None` when the answer is not one the offer allows (the client then fails the
/// connection). `client_window_bits` is the window the client must compress within.
pub fn parse_answer(value: &str) -> Option<Agreement> {
    let mut elements = split_list(value);
    let element = elements.next()?;
    if elements.next().is_some() {
        return None; // one offer, one answer
    }
    let offer = parse_offer(element)?;
    let server_window_bits = match offer.server_max_window_bits {
        Some(bits) if bits < MIN_WINDOW_BITS => return None,
        Some(bits) => bits,
        None => MAX_WINDOW_BITS,
    };
    Some(Agreement {
        server_no_context_takeover: offer.server_no_context_takeover,
        client_no_context_takeover: offer.client_no_context_takeover,
        server_window_bits,
        server_window_bits_named: offer.server_max_window_bits.is_some(),
        // An answer's client_max_window_bits must carry a value (section 7.1.2.2).
        client_window_bits: match offer.client_max_window_bits {
            Some(Some(bits)) if bits >= MIN_WINDOW_BITS => Some(bits),
            Some(_) => return None,
            None => None,
        },
    })
}

/// A parameter value: a token or a quoted string (RFC 7692 section 7.1 allows both).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(inner) => inner.strip_suffix('"').filter(|v| !v.contains('"')),
        None => (!value.is_empty() && !value.contains('"')).then_some(value),
    }
}

/// A window-bits value: 1*DIGIT from 8 to 15, no leading zero (RFC 7692 section 7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u8>().ok().filter(|bits| (8..=MAX_WINDOW_BITS).contains(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agree(values: &[&str]) -> Option<String> {
        negotiate(values.iter().copied(), &Policy::SHARED).map(|a| a.response_value())
    }

    #[test]
    fn what_browsers_and_libraries_send_is_accepted_with_both_no_context_takeovers() {
        // Chromium, Python websockets and Node ws.
        assert_eq!(
            agree(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
        assert_eq!(
            agree(&["permessage-deflate"]).as_deref(),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
    }

    #[test]
    fn the_server_window_is_limited_as_the_offer_asks_and_named_in_the_answer() {
        let agreement =
            negotiate(["permessage-deflate; server_max_window_bits=10"], &Policy::SHARED).expect("accepted");
        assert_eq!(agreement.server_window_bits, 10);
        assert!(agreement.response_value().ends_with("; server_max_window_bits=10"));
        // Quoted values are values too.
        let quoted = negotiate(["permessage-deflate; server_max_window_bits=\"12\""], &Policy::SHARED);
        assert_eq!(quoted.map(|a| a.server_window_bits), Some(12));
    }

    #[test]
    fn offers_are_tried_in_order_and_an_unsupported_one_falls_to_the_next() {
        // 8 bits cannot be honoured by raw deflate in zlib: declined, the fallback taken.
        let agreement = negotiate(
            ["permessage-deflate; server_max_window_bits=8, permessage-deflate; client_max_window_bits"],
            &Policy::SHARED,
        )
        .expect("the second offer");
        assert_eq!(agreement.server_window_bits, 15);
        // Across several header lines, and past other extensions.
        let agreement = negotiate(["x-webkit-deflate-frame", "permessage-deflate"], &Policy::SHARED);
        assert!(agreement.is_some());
    }

    #[test]
    fn malformed_offers_are_declined_never_failed() {
        for offer in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=1a",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; client_max_window_bits=\"9",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; unknown_parameter",
            "permessage-deflate-x",
            "",
            ",,,",
        ] {
            assert_eq!(agree(&[offer]), None, "{offer:?} was accepted");
        }
    }

    #[test]
    fn a_client_window_is_never_named_in_the_answer() {
        // Naming client_max_window_bits is only allowed when offered; the server never needs to.
        for offer in ["permessage-deflate", "permessage-deflate; client_max_window_bits=10"] {
            let agreement = negotiate([offer], &Policy::SHARED).expect("accepted");
            assert_eq!(agreement.client_window_bits, None);
            assert!(!agreement.response_value().contains("client_max_window_bits"));
        }
    }

    #[test]
    fn a_dedicated_policy_keeps_context_unless_the_client_asks_otherwise() {
        let dedicated = Policy {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 12,
        };
        let agreement = negotiate(["permessage-deflate"], &dedicated).expect("accepted");
        assert_eq!(agreement.response_value(), "permessage-deflate; server_max_window_bits=12");
        let agreement =
            negotiate(["permessage-deflate; server_no_context_takeover"], &dedicated).expect("accepted");
        assert!(agreement.server_no_context_takeover);
    }

    #[test]
    fn a_client_reads_the_answers_its_offer_allows_and_nothing_else() {
        let shared =
            parse_answer("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
                .expect("valid");
        assert!(shared.server_no_context_takeover && shared.client_no_context_takeover);
        assert_eq!((shared.server_window_bits, shared.client_window_bits), (15, None));
        let limited =
            parse_answer("permessage-deflate; client_max_window_bits=10; server_max_window_bits=12")
                .expect("valid");
        assert_eq!((limited.server_window_bits, limited.client_window_bits), (12, Some(10)));
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=8",
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; foo",
            "permessage-deflate, permessage-deflate",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        ] {
            assert_eq!(parse_answer(bad), None, "{bad}");
        }
    }
}
