//! `whippet`: flags → Config → daemon::run → exit code.

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
        Ok(Command::Run(config)) => whippet::daemon::run(&config),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("whippet: {e}");
        std::process::exit(e.exit_code());
    }
}
