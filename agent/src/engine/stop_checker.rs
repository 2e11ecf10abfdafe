//! Stop strings over streamed text: finds the earliest stop string across delta boundaries and
//! holds back only the tail that could still turn into one.

/// Watches one sequence's text for its stop strings.
pub struct StopChecker {
    /// Non-empty stop strings.
    stop: Vec<String>,
    include_stop_str_in_output: bool,
    /// Text received but not emitted yet: a tail that is a proper prefix of some stop string.
    pending: String,
    /// Set once a stop string matched; later text is dropped.
    stopped: bool,
}

/// The result of feeding text to a [`StopChecker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCheck {
    /// Text safe to emit now.
    pub emit: String,
    /// The stop string that matched; generation should stop.
    pub matched: Option<String>,
}

impl StopChecker {
    pub fn new(stop: &[String], include_stop_str_in_output: bool) -> Self {
        Self {
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include_stop_str_in_output,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Feeds new text; returns the text that is safe to emit now (text that could still be the
    /// start of a stop string is held back) and the stop string if one matched (then `emit` ends
    /// right before it, or right after it with `include_stop_str_in_output`).
    pub fn push(&mut self, delta: &str) -> StopCheck {
        self.feed(delta, true)
    }

    /// Feeds text that must not stop generation (vLLM checks stop strings only once `min_tokens`
    /// are out), still holding back a tail that a later [`push`](Self::push) may complete into a
    /// stop string. Returns the text safe to emit.
    pub fn push_without_matching(&mut self, delta: &str) -> String {
        self.feed(delta, false).emit
    }

    fn feed(&mut self, delta: &str, matching: bool) -> StopCheck {
        if self.stopped {
            return StopCheck {
                emit: String::new(),
                matched: None,
            };
        }
        let checked = self.pending.len();
        self.pending.push_str(delta);
        if matching {
            if let Some((at, s)) = self.earliest_match(checked) {
                let end = if self.include_stop_str_in_output {
                    at + s.len()
                } else {
                    at
                };
                let matched = Some(s.clone());
                self.pending.truncate(end);
                self.stopped = true;
                return StopCheck {
                    emit: std::mem::take(&mut self.pending),
                    matched,
                };
            }
        }
        let hold = self.holdback_len();
        let tail = self.pending.split_off(self.pending.len() - hold);
        StopCheck {
            emit: std::mem::replace(&mut self.pending, tail),
            matched: None,
        }
    }

    /// The earliest stop string in `pending` that ends past its first `checked` bytes (older
    /// text was checked already, or fed without matching); at the same start, the first listed.
    fn earliest_match(&self, checked: usize) -> Option<(usize, &String)> {
        self.stop
            .iter()
            .filter_map(|s| {
                // Only starts from here end in the new text; a match starts on a char boundary.
                let mut from = checked.saturating_sub(s.len() - 1);
                while !self.pending.is_char_boundary(from) {
                    from += 1;
                }
                self.pending[from..]
                    .find(s.as_str())
                    .map(|at| (from + at, s))
            })
            .min_by_key(|&(at, _)| at)
    }

    /// At the end of generation (EOS/length): returns the held-back text.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that are a proper prefix of some stop string. Such a suffix
    /// starts at a char boundary (it begins like a stop string does), so holding it back never
    /// splits a character.
    fn holdback_len(&self) -> usize {
        let text = self.pending.as_bytes();
        self.stop
            .iter()
            .filter_map(|s| {
                (1..s.len().min(text.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && text.ends_with(&s.as_bytes()[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stop: &[&str], include: bool) -> StopChecker {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        StopChecker::new(&stop, include)
    }

    fn check(emit: &str, matched: Option<&str>) -> StopCheck {
        StopCheck {
            emit: emit.to_string(),
            matched: matched.map(str::to_string),
        }
    }

    #[test]
    fn no_stop_strings_emit_everything_at_once() {
        let mut c = checker(&[], false);
        assert_eq!(c.push("Hello wor"), check("Hello wor", None));
        assert_eq!(c.push("ld"), check("ld", None));
        assert_eq!(c.flush(), "");
    }

    #[test]
    fn match_inside_one_delta() {
        let mut c = checker(&["STOP"], false);
        assert_eq!(c.push("abc STOP def"), check("abc ", Some("STOP")));
        // After a match nothing more comes out.
        assert_eq!(c.push("more"), check("", None));
        assert_eq!(c.flush(), "");
    }

    #[test]
    fn match_across_deltas() {
        let mut c = checker(&["STOP"], false);
        assert_eq!(c.push("abc ST"), check("abc ", None));
        assert_eq!(c.push("O"), check("", None));
        assert_eq!(c.push("Pxyz"), check("", Some("STOP")));
    }

    #[test]
    fn held_prefix_is_released_when_it_diverges() {
        let mut c = checker(&["STOP"], false);
        assert_eq!(c.push("a STO"), check("a ", None));
        assert_eq!(c.push("NE"), check("STONE", None));
        // A new partial prefix inside the same delta is held again.
        assert_eq!(c.push(" S"), check(" ", None));
        assert_eq!(c.flush(), "S");
    }

    #[test]
    fn include_stop_str_in_output() {
        let mut c = checker(&["</s>"], true);
        assert_eq!(c.push("done</"), check("done", None));
        assert_eq!(c.push("s> trailing"), check("</s>", Some("</s>")));
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut c = checker(&["world", "lo w"], false);
        assert_eq!(c.push("hello world"), check("hel", Some("lo w")));
        // Same start: the first in the list.
        let mut c = checker(&["ab", "abc"], true);
        assert_eq!(c.push("xabc"), check("xab", Some("ab")));
        // The longest possible prefix over all stop strings is held.
        let mut c = checker(&["xyz", "yq"], false);
        assert_eq!(c.push("axy"), check("a", None));
        assert_eq!(c.push("q"), check("x", Some("yq")));
    }

    #[test]
    fn holdback_never_splits_a_character() {
        let mut c = checker(&["é!"], false);
        assert_eq!(c.push("café"), check("caf", None));
        assert_eq!(c.push("s"), check("és", None));
        // A stop string sharing only the first byte of a character is not a prefix.
        let mut c = checker(&["èx"], false);
        assert_eq!(c.push("é"), check("é", None));
    }

    #[test]
    fn text_fed_without_matching_never_stops_but_can_start_a_match() {
        let mut c = checker(&["STOP", "ab", "xaby"], false);
        assert_eq!(c.push_without_matching("a STOP b"), "a STOP b");
        // "xab" is held as a prefix of "xaby"; the "ab" inside it came before the threshold.
        assert_eq!(c.push_without_matching("xab"), "");
        assert_eq!(c.push("q ST"), check("xabq ", None));
        // A partial stop string from before the threshold completes after it.
        let mut c = checker(&["STOP"], false);
        assert_eq!(c.push_without_matching("go ST"), "go ");
        assert_eq!(c.push("OP"), check("", Some("STOP")));
    }

    #[test]
    fn flush_returns_the_held_tail() {
        let mut c = checker(&["\n\n"], false);
        assert_eq!(c.push("line\n"), check("line", None));
        assert_eq!(c.flush(), "\n");
        assert_eq!(c.flush(), "");
    }
}
