//! `whippet-intake`: flags → IntakeConfig → intake::Intake → runs until SIGTERM or SIGINT.

use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use whippet::intake::{Intake, IntakeConfig};

fn usage(opts: &getopts::Options) -> String {
    opts.usage("Usage: whippet-intake [OPTIONS]\n\nA Datadog-compatible test intake: stores and decodes what it receives and answers\nDatadog fakeintake queries (/fakeintake/payloads, /fakeintake/routestats, ...).")
}

fn parse(args: &[String]) -> Result<Option<IntakeConfig>, String> {
    let mut o = getopts::Options::new();
    o.optopt(
        "",
        "listen",
        "Address to listen on; port 0 picks a free port (printed). Default 127.0.0.1:8080",
        "ADDR",
    );
    o.optopt(
        "",
        "api-key",
        "Answer 403 to requests whose DD-API-KEY differs. Default: accept any key",
        "KEY",
    );
    o.optopt(
        "",
        "fail",
        "Answer STATUS to the next COUNT data requests, e.g. 503:10. Default none",
        "STATUS:COUNT",
    );
    o.optopt(
        "",
        "fail-for",
        "Answer STATUS to every data request for SECONDS after start, e.g. 503:60. Default none",
        "STATUS:SECONDS",
    );
    o.optopt(
        "",
        "delay-ms",
        "Hold answers this many milliseconds, after the payload is stored. Default 0",
        "MS",
    );
    o.optopt(
        "",
        "slow",
        "Hold only the first N answers (with --delay-ms). Default 0: all",
        "N",
    );
    o.optflag(
        "",
        "print",
        "Print a line per decoded series point, sketch, event and service check",
    );
    o.optflag("h", "help", "Print this help and exit");
    o.optflag("V", "version", "Print the version and exit");
    let m = o.parse(args).map_err(|e| format!("{e} (see --help)"))?;
    if m.opt_present("help") {
        print!("{}", usage(&o));
        return Ok(None);
    }
    if m.opt_present("version") {
        println!("whippet-intake {}", env!("CARGO_PKG_VERSION"));
        return Ok(None);
    }
    let mut config = IntakeConfig::default();
    if let Some(listen) = m.opt_str("listen") {
        config.listen = listen
            .parse()
            .map_err(|_| format!("--listen: '{listen}' is not an address like 127.0.0.1:8080"))?;
    } else {
        config.listen = ([127, 0, 0, 1], 8080).into();
    }
    config.api_key = m.opt_str("api-key");
    if let Some(fail) = m.opt_str("fail") {
        let parsed = fail
            .split_once(':')
            .and_then(|(s, c)| Some((s.parse::<u16>().ok()?, c.parse::<u64>().ok()?)))
            .filter(|(s, _)| (100..=599).contains(s));
        config.fail = Some(
            parsed.ok_or_else(|| format!("--fail: '{fail}' is not STATUS:COUNT like 503:10"))?,
        );
    }
    if let Some(fail) = m.opt_str("fail-for") {
        let parsed = fail
            .split_once(':')
            .and_then(|(s, c)| Some((s.parse::<u16>().ok()?, c.parse::<u64>().ok()?)))
            .filter(|(s, _)| (100..=599).contains(s));
        let (status, secs) = parsed
            .ok_or_else(|| format!("--fail-for: '{fail}' is not STATUS:SECONDS like 503:60"))?;
        config.fail_for = Some((status, Duration::from_secs(secs)));
    }
    if let Some(n) = m.opt_str("slow") {
        config.slow_requests = n
            .parse()
            .map_err(|_| format!("--slow: '{n}' is not a whole number"))?;
    }
    if let Some(ms) = m.opt_str("delay-ms") {
        let ms: u64 = ms
            .parse()
            .map_err(|_| format!("--delay-ms: '{ms}' is not a whole number"))?;
        config.delay = Duration::from_millis(ms);
    }
    config.print = m.opt_present("print");
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
