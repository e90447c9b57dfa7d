//! `whippet`: flags, config file and environment → Config → daemon::run → exit code.

use whippet::config::{self, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match config::parse(&args) {
        Ok(Command::Help(text)) => {
            print!("{text}");
            return;
        }
        Ok(Command::Version) => {
            println!("whippet {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Ok(Command::Check(report)) => {
            print!("{report}");
            return;
        }
        // SIGHUP re-reads the same flags, the config file as it is now, and the environment.
        Ok(Command::Run(config)) => whippet::daemon::run(&config, || match config::parse(&args)? {
            Command::Run(c) => Ok(*c),
            _ => Err(whippet::Error::Config(
                "the command line changed meaning on reload".into(),
            )),
        }),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        for line in e.to_string().lines() {
            eprintln!("whippet: {line}");
        }
        std::process::exit(e.exit_code());
    }
}
