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

/// A warning when the file the API key comes from (the config file or `--api-key-file`)
/// can be read by others, or by a group whippet does not run as (a warning, not a
/// refusal: the operator may have reasons). The packaged config file, 0640 root:whippet,
/// draws none; a systemd credential is systemd's to protect.
pub(crate) fn readable_key_file(config: &Config) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if config.forwarding.api_key.0.is_empty() {
        return None;
    }
    let path = config
        .sources
        .iter()
        .find_map(|(flag, value, source)| match (*flag, source) {
            ("api-key", Source::File { path, .. }) => Some(path.clone()),
            ("api-key-file", Source::File { .. } | Source::Flag | Source::Environment) => {
                Some(std::path::PathBuf::from(value))
            }
            _ => None,
        })?;
    let meta = std::fs::metadata(&path).ok()?;
    let mode = meta.permissions().mode();
    let own_group = meta.gid() == nix::unistd::getegid().as_raw();
    let exposed = mode & 0o004 != 0 || (mode & 0o040 != 0 && !own_group);
    exposed.then(|| {
        format!(
            "{} holds the API key and others can read it (mode {:o}, group {}); chmod o-r it and give it whippet's group, or move the key to /etc/whippet/api_key (see whippet(8), CREDENTIALS)",
            path.display(),
            mode & 0o777,
            meta.gid()
        )
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
        // The file's group is the test's own: group-readable is whippet's group reading it.
        for (mode, warned) in [(0o644, true), (0o604, true), (0o640, false), (0o600, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let warning = readable_key_file(&config());
            assert_eq!(warning.is_some(), warned, "{mode:o}");
            if let Some(w) = warning {
                assert!(w.contains(&format!("(mode {mode:o}, group")), "{w}");
            }
        }
        assert_eq!(readable_key_file(&defaults()), None);
        // Readable by a group whippet does not run as (only root can give the file one).
        if nix::unistd::geteuid().is_root() {
            let other = nix::unistd::Gid::from_raw(nix::unistd::getegid().as_raw() + 4242);
            nix::unistd::chown(&path, None, Some(other)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let w = readable_key_file(&config()).expect("a warning");
            assert!(w.contains("(mode 640, group"), "{w}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}
