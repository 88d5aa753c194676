//! A W3C trace context (`traceparent`) as a validated value, so that it can travel in
//! replicated commands and plans (issue 12: one recovery is one trace across processes).
//! No tracing library here: the value is checked text, `00-<trace id>-<parent id>-<flags>`.

use serde::{Deserialize, Serialize};

/// A W3C `traceparent` of version `00`: 32 lowercase hex digits of trace id and 16 of
/// parent span id, neither all zero, and 2 of flags. Serialized as the plain string; a
/// malformed one is refused when deserialized.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TraceParent(String);

impl TraceParent {
    /// The checked value, or why it is not one.
    pub fn parse(s: &str) -> Result<TraceParent, String> {
        let parts: Vec<&str> = s.split('-').collect();
        let hex = |p: &str, n: usize| {
            p.len() == n
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let ok = parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
            && parts[1].bytes().any(|b| b != b'0')
            && parts[2].bytes().any(|b| b != b'0');
        if ok {
            Ok(TraceParent(s.to_string()))
        } else {
            let shown: String = s.chars().take(64).collect();
            Err(format!(
                "traceparent {shown:?}: expected 00-<32 hex>-<16 hex>-<2 hex>"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trace id (32 hex digits).
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.0[53..55], 16)
            .map(|f| f & 1 == 1)
            .unwrap_or(false)
    }
}

impl TryFrom<String> for TraceParent {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TraceParent::parse(&s)
    }
}

impl From<TraceParent> for String {
    fn from(t: TraceParent) -> String {
        t.0
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparents_are_checked() {
        let t = TraceParent::parse(GOOD).unwrap();
        assert_eq!(t.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert!(t.sampled());
        assert!(!TraceParent::parse(&GOOD.replace("-01", "-00"))
            .unwrap()
            .sampled());
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-0af7651916cd43dd8448eb211c8031é-b7ad6b7169203331-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_is_the_plain_string_and_refuses_a_bad_one() {
        let t = TraceParent::parse(GOOD).unwrap();
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(j, format!("\"{GOOD}\""));
        assert_eq!(serde_json::from_str::<TraceParent>(&j).unwrap(), t);
        assert!(serde_json::from_str::<TraceParent>("\"00-zz\"").is_err());
    }
}
