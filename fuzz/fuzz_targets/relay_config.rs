//! Fuzzes the relay's config parser (`ferry_relay::config::parse_str`, docs/config.md), with
//! every file the example config names present in a fixture directory.
//!
//! Nothing may panic, and:
//! - an invalid config lists at least one problem, each naming its field;
//! - no error message carries the text of a secret key file, whichever field names it
//!   (unless the config itself holds that text);
//! - a valid config parses to the same config again, and reloading it into itself is
//!   accepted (nothing that needs a restart differs from itself) and changes nothing.
#![no_main]

#[path = "common/config_dir.rs"]
mod config_dir;

use ferry_relay::config::{ConfigError, parse_str};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !config_dir::stays_inside(text) {
        return;
    }
    let dir = config_dir::dir();
    let path = dir.join("relay.toml");
    match parse_str(text, &path, dir) {
        Err(e) => {
            if let ConfigError::Invalid { problems, .. } = &e {
                assert!(!problems.is_empty(), "invalid without a problem");
                for p in problems {
                    assert!(!p.field.is_empty() && !p.problem.is_empty(), "{p:?}");
                }
            }
            let message = e.to_string();
            assert!(!message.is_empty());
            config_dir::assert_no_secret(&message, text);
        }
        Ok(config) => {
            assert!(
                config.workers >= 1,
                "workers resolved to {}",
                config.workers
            );
            assert!(!config.listen.is_empty());
            let again = parse_str(text, &path, dir).expect("a valid config parses again");
            assert_eq!(format!("{again:?}"), format!("{config:?}"));
            let reloaded = config
                .reload_from(again)
                .unwrap_or_else(|e| panic!("reloading a config into itself: {e}"));
            assert_eq!(format!("{reloaded:?}"), format!("{config:?}"));
        }
    }
});
