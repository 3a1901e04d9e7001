//! Config validation shared by the relay's and the gateway's config files: each [`Problem`]
//! names the field it is about, and a [`Check`] collects every problem found, so
//! `check-config` lists them all at once instead of stopping at the first.

use std::fmt;

use crate::cidr::Cidr;

/// One problem with a config value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The field, as written in the file (`limits.idle_timeout_secs`, `gateway_keys[1].kid`).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// The problems, one per line after the first, indented: how an error message lists them.
pub fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// Collects problems while a config is validated.
#[derive(Debug, Default)]
pub struct Check {
    /// Every problem found so far, in the order found.
    pub problems: Vec<Problem>,
}

impl Check {
    /// Records that `field` has `problem`.
    pub fn fail(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            problem: problem.into(),
        });
    }

    /// Checks `min <= value <= max`.
    pub fn range(&mut self, field: &str, value: u64, min: u64, max: u64) {
        if value < min || value > max {
            self.fail(
                field,
                format!("must be between {min} and {max}, got {value}"),
            );
        }
    }

    /// Checks a rate per second: finite, above 0, at most 1,000,000.
    pub fn rate(&mut self, field: &str, value: f64) {
        if !(value.is_finite() && value > 0.0 && value <= 1e6) {
            self.fail(
                field,
                format!("must be above 0 and at most 1000000, got {value}"),
            );
        }
    }

    /// Parses a list of IP prefixes (`field[i]` each), refusing a bad one or one listed twice;
    /// returns the good ones, in order.
    pub fn cidrs(&mut self, field: &str, entries: &[String]) -> Vec<Cidr> {
        let mut out: Vec<Cidr> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            match entry.parse::<Cidr>() {
                Ok(cidr) if out.contains(&cidr) => {
                    self.fail(format!("{field}[{i}]"), format!("{cidr} is listed twice"));
                }
                Ok(cidr) => out.push(cidr),
                Err(problem) => self.fail(format!("{field}[{i}]"), problem),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_their_fields_and_join_one_per_line() {
        let mut check = Check::default();
        check.range("a.b", 7, 1, 5);
        check.range("a.c", 3, 1, 5);
        check.rate("a.d", f64::NAN);
        check.rate("a.e", 2.5);
        check.fail("a.f", "is wrong");
        assert_eq!(
            join(&check.problems),
            "a.b: must be between 1 and 5, got 7\n  \
             a.d: must be above 0 and at most 1000000, got NaN\n  a.f: is wrong"
        );
    }
}
