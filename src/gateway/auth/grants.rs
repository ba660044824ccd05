//! A token's topic permissions: glob patterns (`*` any run of characters, `?` one) in one claim,
//! `{"subscribe": ["news.*"], "publish": ["chat.u1"]}`. A token without the claim grants no topic;
//! a malformed claim grants nothing rather than failing the token.

use serde_json::Value;
use wildmatch::WildMatch;

/// What a client may subscribe and publish to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    subscribe: Vec<String>,
    publish: Vec<String>,
}

impl Grants {
    /// The grants in the permissions claim's value (`None`: the token has no such claim).
    pub fn from_claim(claim: Option<&Value>) -> Grants {
        let patterns = |name: &str| -> Vec<String> {
            claim
                .and_then(|c| c.get(name))
                .and_then(Value::as_array)
                .map(|list| list.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default()
        };
        Grants { subscribe: patterns("subscribe"), publish: patterns("publish") }
    }

    /// Whether `topic` may be subscribed to.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        matches_any(&self.subscribe, topic)
    }

    /// Whether `topic` may be published to.
    pub fn may_publish(&self, topic: &str) -> bool {
        matches_any(&self.publish, topic)
    }
}

fn matches_any(patterns: &[String], topic: &str) -> bool {
    patterns.iter().any(|pattern| WildMatch::new(pattern).matches(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_globs_over_the_whole_topic() {
        let claim = serde_json::json!({"subscribe": ["news.*", "room-?"], "publish": ["chat.u1"]});
        let grants = Grants::from_claim(Some(&claim));
        assert!(grants.may_subscribe("news.sport") && grants.may_subscribe("news."));
        assert!(grants.may_subscribe("room-7") && !grants.may_subscribe("room-17"));
        assert!(!grants.may_subscribe("xnews.sport") && !grants.may_subscribe("chat.u1"));
        assert!(grants.may_publish("chat.u1") && !grants.may_publish("chat.u2"));
    }

    #[test]
    fn no_claim_or_a_malformed_one_grants_nothing() {
        assert!(!Grants::from_claim(None).may_subscribe("news"));
        let malformed = serde_json::json!({"subscribe": "news"});
        assert!(!Grants::from_claim(Some(&malformed)).may_subscribe("news"));
        let mixed = serde_json::json!({"subscribe": [1, "news"]});
        assert!(Grants::from_claim(Some(&mixed)).may_subscribe("news"));
    }
}
