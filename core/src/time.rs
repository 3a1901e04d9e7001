//! Wall-clock time as a value. `ferry-core` never reads the clock: callers pass `now`.

use std::fmt;

/// A point in wall-clock time, in whole seconds since the Unix epoch (UTC).
///
/// Tokens carry their validity in this unit. Monotonic deadlines inside one process (rekey age,
/// idle timers) use [`std::time::Instant`] passed in by the caller instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixTime(pub u64);

impl UnixTime {
    /// Seconds since the Unix epoch.
    pub const fn as_secs(self) -> u64 {
        self.0
    }

    /// `self + secs`, saturating at the far future instead of wrapping.
    pub const fn saturating_add(self, secs: u64) -> Self {
        Self(self.0.saturating_add(secs))
    }

    /// `self - secs`, saturating at the epoch.
    pub const fn saturating_sub(self, secs: u64) -> Self {
        Self(self.0.saturating_sub(secs))
    }
}

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0)
    }
}

impl From<std::time::SystemTime> for UnixTime {
    /// Converts a clock reading taken by the IO layer; times before the epoch become 0.
    fn from(t: std::time::SystemTime) -> Self {
        Self(
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
    }
}
