//! Fuzzes the gateway's config parser (`ferry_gateway::config::parse_str`, docs/config.md),
//! with every file the example config names present in a fixture directory.
//!
//! Nothing may panic, and:
//! - an invalid config lists at least one problem, each naming its field;
//! - no error message carries the text of a secret file (signing key, TLS key, Redis
//!   password), whichever field names it (unless the config itself holds that text);
//! - a valid config parses again to the same restart-only settings, and reloading it into
//!   itself is accepted.
#![no_main]

#[path = "common/config_dir.rs"]
mod config_dir;

use ferry_gateway::config::{ConfigError, parse_str};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !config_dir::stays_inside(text) {
        return;
    }
    let dir = config_dir::dir();
    let path = dir.join("gateway.toml");
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
            let again = parse_str(text, &path, dir).expect("a valid config parses again");
            assert_eq!(again.restart_settings(), config.restart_settings());
            if let Err(e) = config.restart_settings().check_reload(again) {
                panic!("reloading a config into itself: {e}");
            }
        }
    }
});
