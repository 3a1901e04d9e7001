//! One line for an error and its causes, as a command-line program prints it.
//!
//! Many errors here say their cause in their own message *and* return it as their `source()`
//! (so that a log line of the error alone is complete). Printing the whole chain, as
//! `anyhow`'s `{:#}` does, then says each such cause twice ("key file k: No such file or
//! directory (os error 2): No such file or directory (os error 2)"). [`one_line`] joins the
//! chain with `": "` but leaves out a cause whose text the line already holds.

use std::error::Error;

/// `error` and its causes (`source()` after `source()`) on one line, each cause whose text
/// the line already holds left out.
pub fn one_line(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct Wrap(&'static str, Option<Box<dyn Error + 'static>>);

    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref()
        }
    }

    #[test]
    fn a_cause_the_message_already_says_is_left_out() {
        let io = Wrap("No such file (os error 2)", None);
        let key = Wrap("key file k: No such file (os error 2)", Some(Box::new(io)));
        let top = Wrap("reading the identity k", Some(Box::new(key)));
        assert_eq!(
            one_line(&top),
            "reading the identity k: key file k: No such file (os error 2)"
        );
        // A cause the message does not say is kept.
        let plain = Wrap("opening x", Some(Box::new(Wrap("denied", None))));
        assert_eq!(one_line(&plain), "opening x: denied");
        assert_eq!(one_line(&Wrap("alone", None)), "alone");
    }
}
