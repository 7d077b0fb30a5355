//! W3C Trace Context `traceparent` values (<https://www.w3.org/TR/trace-context/>):
//! `version-traceid-parentid-flags`, lower-case hex, e.g.
//! `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
//!
//! A client's value is kept in the router's logs and passed to the workers with each
//! dispatch (`DispatchRequest.traceparents`). A value that does not parse is dropped, as
//! the recommendation says: a broken header never fails a request.

use std::fmt;

/// Parsed `traceparent`. Future versions (above 00) are read by their first four fields,
/// as the specification asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

/// The most trace contexts one dispatch message carries (a step of many traced
/// requests sends the first ones; a worker ignores any beyond this).
pub const MAX_TRACEPARENTS_PER_DISPATCH: usize = 64;

impl TraceParent {
    /// Parses a header value; `None` for anything the specification calls invalid.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim();
        let mut parts = v.split('-');
        let version = hex_byte(parts.next()?)?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = hex_byte(parts.next()?)?;
        // Version 255 is forbidden; version 00 has exactly four fields, later versions
        // may append more (length 55 is the 00 form).
        if version == 0xff || (version == 0 && (parts.next().is_some() || v.len() != 55)) {
            return None;
        }
        let trace_id: [u8; 16] = hex_bytes(trace)?;
        let parent_id: [u8; 8] = hex_bytes(parent)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace id, 32 lower-case hex digits (what log queries join on).
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The caller's span id, 16 lower-case hex digits.
    pub fn parent_id(&self) -> String {
        hex(&self.parent_id)
    }

    /// Whether the caller sampled this trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    /// The canonical version-00 form (lower case, four fields).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        // Upper case is invalid in the specification.
        _ => None,
    }
}

fn hex_byte(s: &str) -> Option<u8> {
    let [hi, lo] = s.as_bytes() else { return None };
    Some(hex_digit(*hi)? << 4 | hex_digit(*lo)?)
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_canonical_form() {
        let t = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.to_string(), GOOD);
        // Surrounding whitespace (as proxies leave it) is tolerated.
        assert_eq!(TraceParent::parse(&format!(" {GOOD} ")), Some(t));
    }

    #[test]
    fn refuses_what_the_specification_calls_invalid() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // upper case
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // all-zero trace id and parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff, and version 00 with an extra field
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
            // wrong lengths and non-hex
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bg-01",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        let t = TraceParent::parse(v).expect("future versions parse");
        assert!(!t.sampled());
        assert_eq!(
            t.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
    }
}
