//! Checks of a resolved [`Config`] against the system it runs on: who runs whippet, and who
//! can read the file that holds the API key.

use super::{Config, Source};
use crate::Error;

/// whippet needs no privilege, so running as root is a mistake unless the operator says so.
pub(crate) fn refuse_root(config: &Config, is_root: bool) -> Result<(), Error> {
    if is_root && !config.operation.allow_root {
        return Err(Error::Config(
            "refusing to run as root: whippet needs no privilege; run it as an unprivileged user (the packaged service uses User=whippet) or pass --allow-root (WHIPPET_ALLOW_ROOT=true)".into(),
        ));
    }
    Ok(())
}

/// A warning when the API key comes from a config file that group or others can read (a
/// warning, not a refusal: the operator may have reasons).
pub(crate) fn readable_key_file(config: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    config.sources.iter().find_map(|(flag, _, source)| {
        let (&"api-key", Source::File { path, .. }) = (flag, source) else {
            return None;
        };
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        (mode & 0o044 != 0).then(|| {
            format!(
                "{} holds the API key and is readable by group or others (mode {:o}); chmod 0600 it or move the key to a credential file",
                path.display(),
                mode & 0o777
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_with, Command};

    fn defaults() -> Config {
        match parse_with(&[], &|_| None) {
            Ok(Command::Run(config)) => *config,
            other => panic!("the defaults do not parse: {other:?}"),
        }
    }

    #[test]
    fn root_is_refused_unless_allowed() {
        let mut config = defaults();
        let err = refuse_root(&config, true).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--allow-root"), "{err}");
        assert_eq!(refuse_root(&config, false), Ok(()));
        config.operation.allow_root = true;
        assert_eq!(refuse_root(&config, true), Ok(()));
    }

    #[test]
    fn a_key_file_others_can_read_draws_a_warning_naming_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("whippet-key-{}.conf", std::process::id()));
        std::fs::write(&path, "DD_API_KEY=k\n").unwrap();
        let args = vec!["--config".to_string(), path.display().to_string()];
        let config = || match parse_with(&args, &|_| None) {
            Ok(Command::Run(c)) => *c,
            other => panic!("{other:?}"),
        };
        for (mode, warned) in [(0o644, true), (0o640, true), (0o600, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let warning = readable_key_file(&config());
            assert_eq!(warning.is_some(), warned, "{mode:o}");
            if let Some(w) = warning {
                assert!(w.contains(&format!("(mode {mode:o})")), "{w}");
            }
        }
        assert_eq!(readable_key_file(&defaults()), None);
        std::fs::remove_file(&path).unwrap();
    }
}
