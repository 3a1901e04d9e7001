//! The receiver's sliding replay window (docs/protocol.md §9.2).
//!
//! A window remembers which of the last [`WINDOW_SIZE`] counters below the highest one seen have
//! arrived. The transport asks [`ReplayWindow::will_accept`] *before* spending an AEAD
//! operation and calls [`ReplayWindow::mark_received`] only *after* the tag verifies, so a
//! forged frame can never move the window.
//!
//! The bitmap is a ring of `u64` words indexed by `counter / 64`: moving the window forward
//! clears only the words that newly enter it, never shifts the whole map. It holds one word more
//! than the window needs, so every counter inside the window has a bit of its own even when the
//! window's lower edge falls in the middle of a word.

/// How many counters below the next expected one the window remembers.
pub const WINDOW_SIZE: u64 = 8192;

const WORD_BITS: u64 = u64::BITS as u64;
/// One spare word so that the window's partial lowest word never shares bits with its newest.
const WORDS: usize = (WINDOW_SIZE / WORD_BITS) as usize + 1;

/// A sliding window over 64-bit message counters; see the module docs.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    /// One past the highest counter marked received (0 when nothing has been received).
    next: u64,
    bitmap: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl ReplayWindow {
    /// An empty window: every counter except `u64::MAX` is acceptable.
    pub const fn new() -> Self {
        Self {
            next: 0,
            bitmap: [0; WORDS],
        }
    }

    /// One past the highest counter marked received so far.
    pub const fn next_expected(&self) -> u64 {
        self.next
    }

    /// Whether `counter` is older than the window (it can never be accepted again).
    pub const fn is_too_old(&self, counter: u64) -> bool {
        counter < self.next && self.next - counter > WINDOW_SIZE
    }

    /// Cheap pre-check before decrypting: `false` if `counter` was already received, is older
    /// than the window, or is `u64::MAX` (reserved by Noise, never sent).
    pub fn will_accept(&self, counter: u64) -> bool {
        if counter == u64::MAX || self.is_too_old(counter) {
            return false;
        }
        counter >= self.next || !self.bit(counter)
    }

    /// Records `counter` after its frame authenticated. Returns `false` (and changes nothing) if
    /// [`will_accept`](Self::will_accept) would have refused it, e.g. a duplicate that raced in.
    pub fn mark_received(&mut self, counter: u64) -> bool {
        if !self.will_accept(counter) {
            return false;
        }
        if counter >= self.next {
            self.advance_to(counter);
        }
        let (word, mask) = position(counter);
        self.bitmap[word] |= mask;
        true
    }

    /// Moves the top of the window to `counter` (≥ `next`), clearing the words that enter it.
    fn advance_to(&mut self, counter: u64) {
        let new_top = counter / WORD_BITS;
        // The first word not yet part of the window: the word after the current top, or word
        // 0 of an empty window.
        let first_new = match self.next {
            0 => 0,
            next => (next - 1) / WORD_BITS + 1,
        };
        if new_top >= first_new {
            let fresh = new_top - first_new + 1;
            if fresh >= WORDS as u64 {
                self.bitmap = [0; WORDS];
            } else {
                for block in first_new..=new_top {
                    self.bitmap[ring_index(block)] = 0;
                }
            }
        }
        self.next = counter + 1;
    }

    fn bit(&self, counter: u64) -> bool {
        let (word, mask) = position(counter);
        self.bitmap[word] & mask != 0
    }
}

fn ring_index(block: u64) -> usize {
    // The remainder is < WORDS, so it always fits in usize.
    (block % WORDS as u64) as usize
}

fn position(counter: u64) -> (usize, u64) {
    (
        ring_index(counter / WORD_BITS),
        1u64 << (counter % WORD_BITS),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// `mark_received(counter)` must return the given answer (and `will_accept` agree).
        Mark(u64, bool),
        /// `will_accept(counter)` must return the given answer; nothing is marked.
        Check(u64, bool),
    }
    use Step::{Check, Mark};

    fn run(name: &str, steps: &[Step]) {
        let mut window = ReplayWindow::new();
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Mark(counter, want) => {
                    assert_eq!(
                        window.will_accept(counter),
                        want,
                        "{name} step {i}: will_accept"
                    );
                    assert_eq!(window.mark_received(counter), want, "{name} step {i}: mark");
                }
                Check(counter, want) => {
                    assert_eq!(window.will_accept(counter), want, "{name} step {i}: check");
                }
            }
        }
    }

    const W: u64 = WINDOW_SIZE;

    #[test]
    fn table() {
        let cases: &[(&str, &[Step])] = &[
            (
                "in order",
                &[Mark(0, true), Mark(1, true), Mark(2, true), Mark(3, true)],
            ),
            (
                "duplicate",
                &[Mark(0, true), Mark(1, true), Mark(1, false), Mark(0, false)],
            ),
            (
                "reordered",
                &[Mark(5, true), Mark(3, true), Mark(4, true), Mark(3, false)],
            ),
            (
                "first frame far ahead",
                &[Mark(100_000, true), Mark(100_001 - W, true)],
            ),
            (
                "exactly at the window edge",
                &[
                    Mark(10_000, true),
                    Check(10_001 - W, true),
                    Check(10_000 - W, false),
                    Mark(10_001 - W, true),
                    Mark(10_001 - W, false),
                ],
            ),
            (
                "old beyond window",
                &[Mark(0, true), Mark(W, true), Check(0, false), Mark(1, true)],
            ),
            (
                "far jump ahead clears the bitmap",
                &[
                    Mark(0, true),
                    Mark(1, true),
                    Mark(65, true),
                    Mark(1 << 40, true),
                    // The new window's lower edge: never seen, though ring words were reused.
                    Mark((1 << 40) - W + 1, true),
                    Check((1 << 40) - W, false),
                    Mark((1 << 40) - 1, true),
                    Check(1, false),
                    Mark(1 << 40, false),
                ],
            ),
            (
                "jump by exactly one ring clears stale bits",
                &[
                    Mark(3, true),
                    Mark(3 + 64 * WORDS as u64, true),
                    Check(3 + 64 * (WORDS as u64 - 1), true),
                ],
            ),
            (
                "reserved counter",
                &[Mark(u64::MAX, false), Mark(u64::MAX - 1, true)],
            ),
            (
                "top of the counter space",
                &[
                    Mark(u64::MAX - 1, true),
                    Mark(u64::MAX - 2, true),
                    Mark(u64::MAX - 1, false),
                ],
            ),
        ];
        for (name, steps) in cases {
            run(name, steps);
        }
    }

    /// The obvious model: a set of everything seen and the highest counter.
    #[derive(Default)]
    struct Model {
        seen: HashSet<u64>,
        next: u64,
    }

    impl Model {
        fn will_accept(&self, c: u64) -> bool {
            c != u64::MAX
                && !self.seen.contains(&c)
                && (c >= self.next || self.next - c <= WINDOW_SIZE)
        }
        fn mark(&mut self, c: u64) -> bool {
            if !self.will_accept(c) {
                return false;
            }
            self.seen.insert(c);
            self.next = self.next.max(c + 1);
            true
        }
    }

    fn counter_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..200,
            0u64..3 * WINDOW_SIZE,
            0u64..40 * WINDOW_SIZE,
            (u64::MAX - 3 * WINDOW_SIZE)..=u64::MAX,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec((counter_strategy(), any::<bool>()), 1..400)) {
            let mut window = ReplayWindow::new();
            let mut model = Model::default();
            for (counter, mark) in ops {
                prop_assert_eq!(window.will_accept(counter), model.will_accept(counter));
                if mark {
                    prop_assert_eq!(window.mark_received(counter), model.mark(counter));
                }
            }
        }

        #[test]
        fn walk_near_previous(start in 0u64..1_000_000, steps in proptest::collection::vec(-9000i64..300, 1..300)) {
            let mut window = ReplayWindow::new();
            let mut model = Model::default();
            let mut c = start;
            for step in steps {
                c = c.saturating_add_signed(step);
                prop_assert_eq!(window.will_accept(c), model.will_accept(c));
                prop_assert_eq!(window.mark_received(c), model.mark(c));
            }
        }
    }
}
