//! `whippet-intake`: flags → IntakeConfig → intake::Intake → runs until SIGTERM or SIGINT.

use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use whippet::intake::{Intake, IntakeConfig};

fn usage(opts: &getopts::Options) -> String {
    opts.usage("Usage: whippet-intake [OPTIONS]\n\nA Datadog-compatible test intake: stores and decodes what it receives and answers\nDatadog fakeintake queries (/fakeintake/payloads, /fakeintake/routestats, ...).")
}

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    let flags: [(&str, &str, &str); 6] = [
        ("listen", "ADDR", "Address to listen on; port 0 picks a free port (printed). Default 127.0.0.1:8080"),
        ("api-key", "KEY", "Answer 403 to requests whose DD-API-KEY differs. Default: accept any key"),
        ("fail", "STATUS:COUNT", "Answer STATUS to the next COUNT data requests, e.g. 503:10. Default none"),
        ("fail-for", "STATUS:SECONDS", "Answer STATUS to every data request for SECONDS after start, e.g. 503:60. Default none"),
        ("delay-ms", "MS", "Hold answers this many milliseconds, after the payload is stored. Default 0"),
        ("slow", "N", "Hold only the first N answers (with --delay-ms). Default 0: all"),
    ];
    for (name, hint, help) in flags {
        o.optopt("", name, help, hint);
    }
    o.optflag(
        "",
        "print",
        "Print a line per decoded series point, sketch, event and service check",
    );
    o.optflag("h", "help", "Print this help and exit");
    o.optflag("V", "version", "Print the version and exit");
    o
}

/// `STATUS:N`, an HTTP status and a whole number.
fn status_and(v: &str) -> Option<(u16, u64)> {
    v.split_once(':')
        .and_then(|(s, n)| Some((s.parse::<u16>().ok()?, n.parse::<u64>().ok()?)))
        .filter(|(s, _)| (100..=599).contains(s))
}

fn number(m: &getopts::Matches, name: &str) -> Result<Option<u64>, String> {
    m.opt_str(name)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("--{name}: '{v}' is not a whole number"))
        })
        .transpose()
}

fn parse(args: &[String]) -> Result<Option<IntakeConfig>, String> {
    let o = options();
    let m = o.parse(args).map_err(|e| format!("{e} (see --help)"))?;
    if m.opt_present("help") {
        print!("{}", usage(&o));
        return Ok(None);
    }
    if m.opt_present("version") {
        println!("whippet-intake {}", env!("CARGO_PKG_VERSION"));
        return Ok(None);
    }
    let listen = m
        .opt_str("listen")
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let mut config = IntakeConfig {
        listen: listen
            .parse()
            .map_err(|_| format!("--listen: '{listen}' is not an address like 127.0.0.1:8080"))?,
        api_key: m.opt_str("api-key"),
        print: m.opt_present("print"),
        ..IntakeConfig::default()
    };
    if let Some(fail) = m.opt_str("fail") {
        let bad = || format!("--fail: '{fail}' is not STATUS:COUNT like 503:10");
        config.fail = Some(status_and(&fail).ok_or_else(bad)?);
    }
    if let Some(fail) = m.opt_str("fail-for") {
        let bad = || format!("--fail-for: '{fail}' is not STATUS:SECONDS like 503:60");
        let (status, secs) = status_and(&fail).ok_or_else(bad)?;
        config.fail_for = Some((status, Duration::from_secs(secs)));
    }
    if let Some(n) = number(&m, "slow")? {
        config.slow_requests = n;
    }
    if let Some(ms) = number(&m, "delay-ms")? {
        config.delay = Duration::from_millis(ms);
    }
    Ok(Some(config))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse(&args) {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            eprintln!("whippet-intake: {e}");
            std::process::exit(2);
        }
    };
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("whippet-intake: cannot install signal handlers: {e}");
            std::process::exit(1);
        }
    };
    let intake = match Intake::start(config) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("whippet-intake: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("whippet-intake: listening on {}", intake.url());
    signals.forever().next();
    let routes = intake.store().routes();
    intake.stop();
    for (route, count) in routes {
        eprintln!("whippet-intake: {route} {count} requests");
    }
}
