//! Stop criteria for one generated sequence: max_tokens, stop token ids / EOS, and stop strings.
//!
//! The token-level checks ([`StopChecker::on_token`]) and the text-level check
//! ([`StopChecker::on_text`]) are separate because detokenised text arrives
//! independently of token ids (a token may decode to nothing, or to part of a
//! stop string). Stop strings are matched on the emitted text, OpenAI style:
//! the text returned to the client ends right before the stop string, and
//! text that might still turn out to be the start of a stop string is held
//! back until it is known not to be.

use crate::sampling::SamplingError;

/// Most stop strings one request may carry (keeps the per-push matching cost bounded).
pub const MAX_STOP_STRINGS: usize = 16;

/// Why a sequence finished, as reported in the API's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// max_tokens reached.
    Length,
    /// A stop token, EOS, or stop string.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct StopParams {
    /// Must be >= 1.
    pub max_tokens: u32,
    pub stop_token_ids: Vec<u32>,
    /// Stop strings; each non-empty, at most [`MAX_STOP_STRINGS`].
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl StopParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if self.max_tokens == 0 {
            return Err(SamplingError::Invalid {
                field: "max_tokens",
                reason: "must be >= 1".to_string(),
            });
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(SamplingError::Invalid {
                field: "stop",
                reason: format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop.len()
                ),
            });
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(SamplingError::Invalid {
                field: "stop",
                reason: "stop strings must not be empty".to_string(),
            });
        }
        Ok(())
    }
}

/// Tracks one sequence's stop state as tokens and their text arrive.
///
/// Intended use per generated token: call [`on_token`](Self::on_token); if it returns
/// `Some(Stop)` the token is a stop token / EOS — keep it in the token ids but do not decode
/// or emit its text (that is the caller's choice; this type never sees it), then call
/// [`flush`](Self::flush). Otherwise feed its decoded text to [`on_text`](Self::on_text) and
/// emit what comes back; after `Some(Length)` (the last token's text is still emitted) or a
/// stop-string match, call `flush` for whatever text was held back.
#[derive(Debug, Clone)]
pub struct StopChecker {
    params: StopParams,
    eos_token_ids: Vec<u32>,
    generated: u32,
    /// Text received but not yet emitted because it may begin a stop string.
    pending: String,
    /// A stop string matched: everything after it is dropped.
    text_stopped: bool,
}

impl StopChecker {
    /// `params` should have passed [`StopParams::validate`]; empty stop strings are dropped
    /// here anyway, since one would match everywhere and stop before any text.
    pub fn new(mut params: StopParams, eos_token_ids: Vec<u32>) -> Self {
        params.stop.retain(|s| !s.is_empty());
        Self {
            params,
            eos_token_ids,
            generated: 0,
            pending: String::new(),
            text_stopped: false,
        }
    }

    /// Tokens counted so far.
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Call after each generated token (before its text). Returns Some(Stop) for a stop token id
    /// or EOS (unless ignore_eos), Some(Length) when this token reaches max_tokens. A stop token
    /// that also reaches max_tokens reports Stop: the model chose to end there.
    pub fn on_token(&mut self, token_id: u32) -> Option<FinishReason> {
        self.generated = self.generated.saturating_add(1);
        let is_eos = !self.params.ignore_eos && self.eos_token_ids.contains(&token_id);
        if is_eos || self.params.stop_token_ids.contains(&token_id) {
            Some(FinishReason::Stop)
        } else if self.generated >= self.params.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Feeds newly decoded text; returns the text that is safe to emit now and whether a stop
    /// string matched. When one matches, the emitted text ends right before it (the stop string
    /// is not included) and the result says Stop; later calls return nothing. Stop strings may
    /// span several pushes.
    pub fn on_text(&mut self, text: &str) -> (String, Option<FinishReason>) {
        if self.text_stopped {
            return (String::new(), Some(FinishReason::Stop));
        }
        self.pending.push_str(text);
        if self.params.stop.is_empty() {
            return (std::mem::take(&mut self.pending), None);
        }

        // Earliest match wins, whichever stop string it is. `pending` never holds more than the
        // longest stop string's length of old text, so searching it all again is cheap, and
        // needed: a match may start in the held-back part.
        let first = self
            .params
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.pending.truncate(at);
            self.text_stopped = true;
            return (std::mem::take(&mut self.pending), Some(FinishReason::Stop));
        }

        let keep_from = self.holdback_start();
        let rest = self.pending.split_off(keep_from);
        (std::mem::replace(&mut self.pending, rest), None)
    }

    /// At the end (length / stop token), returns any held-back text. Empty after a stop-string
    /// match, since what was held then lay after the stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Byte offset where the longest suffix of `pending` that is a proper prefix of some stop
    /// string begins (`pending.len()` if there is none). Always a char boundary: a match starts
    /// like a stop string does, with a char's first byte, and the check below confirms it.
    fn holdback_start(&self) -> usize {
        let bytes = self.pending.as_bytes();
        let mut start = bytes.len();
        for s in &self.params.stop {
            let s = s.as_bytes();
            // Only suffixes shorter than `s` matter (a full match was handled), and only ones
            // longer than what is already held back could move `start` earlier.
            let longest = s.len().saturating_sub(1).min(bytes.len());
            for len in ((bytes.len() - start + 1)..=longest).rev() {
                let from = bytes.len() - len;
                if self.pending.is_char_boundary(from) && bytes[from..] == s[..len] {
                    start = from;
                    break;
                }
            }
        }
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stop: &[&str]) -> StopChecker {
        let params = StopParams {
            max_tokens: 100,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..StopParams::default()
        };
        StopChecker::new(params, vec![2])
    }

    /// Pushes pieces in order; returns all emitted text and the first finish reason.
    fn feed(c: &mut StopChecker, pieces: &[&str]) -> (String, Option<FinishReason>) {
        let mut out = String::new();
        for p in pieces {
            let (text, reason) = c.on_text(p);
            out.push_str(&text);
            if reason.is_some() {
                return (out, reason);
            }
        }
        (out, None)
    }

    #[test]
    fn validate_checks_max_tokens_and_stop_strings() {
        let field = |p: StopParams| match p.validate() {
            Err(SamplingError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        };
        let ok = StopParams {
            max_tokens: 1,
            ..StopParams::default()
        };
        assert!(ok.validate().is_ok());
        assert_eq!(field(StopParams::default()), "max_tokens");
        assert_eq!(
            field(StopParams {
                stop: vec![String::new()],
                ..ok.clone()
            }),
            "stop"
        );
        assert_eq!(
            field(StopParams {
                stop: vec!["x".into(); 17],
                ..ok.clone()
            }),
            "stop"
        );
        assert!(StopParams {
            stop: vec!["x".into(); 16],
            ..ok
        }
        .validate()
        .is_ok());
        assert_eq!(FinishReason::Length.as_str(), "length");
        assert_eq!(FinishReason::Stop.as_str(), "stop");
    }

    #[test]
    fn max_tokens_counts_every_token() {
        let params = StopParams {
            max_tokens: 3,
            ..StopParams::default()
        };
        let mut c = StopChecker::new(params, vec![]);
        assert_eq!(c.on_token(10), None);
        assert_eq!(c.on_token(11), None);
        assert_eq!(c.on_token(12), Some(FinishReason::Length));
        assert_eq!(c.generated(), 3);
    }

    #[test]
    fn eos_and_stop_token_ids() {
        let params = StopParams {
            max_tokens: 5,
            stop_token_ids: vec![7],
            ..StopParams::default()
        };
        let mut c = StopChecker::new(params.clone(), vec![2]);
        assert_eq!(c.on_token(1), None);
        assert_eq!(c.on_token(2), Some(FinishReason::Stop));
        let mut c = StopChecker::new(params.clone(), vec![2]);
        assert_eq!(c.on_token(7), Some(FinishReason::Stop));
        // ignore_eos: EOS is an ordinary token, but stop_token_ids still stop.
        let mut c = StopChecker::new(
            StopParams {
                ignore_eos: true,
                ..params
            },
            vec![2],
        );
        assert_eq!(c.on_token(2), None);
        assert_eq!(c.on_token(2), None);
        assert_eq!(c.on_token(7), Some(FinishReason::Stop));
        // A stop token on the last allowed position still reports Stop.
        let mut c = StopChecker::new(
            StopParams {
                max_tokens: 1,
                ..StopParams::default()
            },
            vec![2],
        );
        assert_eq!(c.on_token(2), Some(FinishReason::Stop));
    }

    #[test]
    fn text_without_stop_strings_passes_straight_through() {
        let mut c = checker(&[]);
        assert_eq!(c.on_text("hello "), ("hello ".to_string(), None));
        assert_eq!(c.flush(), "");
    }

    #[test]
    fn stop_string_spanning_pushes() {
        let mut c = checker(&["</answer>"]);
        let (a, r) = c.on_text("the result</an");
        assert_eq!((a.as_str(), r), ("the result", None));
        let (b, r) = c.on_text("sw");
        assert_eq!((b.as_str(), r), ("", None));
        let (d, r) = c.on_text("er> trailing");
        assert_eq!((d.as_str(), r), ("", Some(FinishReason::Stop)));
        assert_eq!(c.flush(), "");
        assert_eq!(c.on_text("more"), (String::new(), Some(FinishReason::Stop)));
    }

    #[test]
    fn held_back_text_released_when_it_cannot_match() {
        let mut c = checker(&["STOP"]);
        assert_eq!(c.on_text("abc ST"), ("abc ".to_string(), None));
        assert_eq!(c.on_text("O"), (String::new(), None));
        // "STOX" cannot begin "STOP", nor can any of its suffixes.
        assert_eq!(c.on_text("X"), ("STOX".to_string(), None));
        assert_eq!(c.on_text("yS"), ("y".to_string(), None));
        assert_eq!(c.flush(), "S");
        // A repeated prefix: "SSTOP" must stop after emitting the first "S".
        let mut c = checker(&["STOP"]);
        assert_eq!(
            feed(&mut c, &["S", "S", "T", "O", "P"]),
            ("S".into(), Some(FinishReason::Stop))
        );
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut c = checker(&["world", "lo w", "xyz"]);
        assert_eq!(
            feed(&mut c, &["hel", "lo world"]),
            ("hel".into(), Some(FinishReason::Stop))
        );
        let mut c = checker(&["bb", "abbb"]);
        // "abbb" would start earlier but is not complete; "bb" completes first in the text.
        assert_eq!(
            feed(&mut c, &["xab", "bc"]),
            ("xa".into(), Some(FinishReason::Stop))
        );
        // Holding back follows the longest possible partial match among all stop strings.
        let mut c = checker(&["ab", "xyzab"]);
        assert_eq!(c.on_text("1xyza"), ("1".to_string(), None));
        assert_eq!(c.on_text("q"), ("xyzaq".to_string(), None));
    }

    #[test]
    fn unicode_stop_strings_never_split_chars() {
        let mut c = checker(&["終わり", "🛑"]);
        let (a, r) = c.on_text("こんにちは終");
        assert_eq!((a.as_str(), r), ("こんにちは", None));
        let (b, r) = c.on_text("わ");
        assert_eq!((b.as_str(), r), ("", None));
        assert_eq!(c.on_text("る"), ("終わる".to_string(), None));
        assert_eq!(
            feed(&mut c, &["é", "🛑x"]),
            ("é".into(), Some(FinishReason::Stop))
        );
        // A stop string sharing leading bytes with a different char is not a partial match.
        let mut c = checker(&["é"]); // 0xC3 0xA9
        assert_eq!(c.on_text("Ã"), ("Ã".to_string(), None)); // 0xC3 0x83
    }

    #[test]
    fn flush_returns_held_text_at_length_end() {
        let mut c = checker(&["###"]);
        assert_eq!(c.on_text("done ##"), ("done ".to_string(), None));
        assert_eq!(c.flush(), "##");
        assert_eq!(c.flush(), "");
    }
}
