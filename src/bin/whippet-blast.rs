//! `whippet-blast`: `send` replays a corpus or generated workload to a socket, `bench` runs
//! the benchmark table against the release `whippet`, `sink` is the drain-only floor,
//! `replay` sends a whippet capture again.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use whippet::blast::{self, bench, Generated, Plan, Target};

const USAGE: &str = "Usage: whippet-blast send|bench|sink [OPTIONS]

  send   --target udp:HOST:PORT|unix:PATH|stream:PATH [--corpus FILE | --contexts N
         --tags-per-message N --messages N --seed N] [--packet-size BYTES] [--rate MSG/S]
         [--duration SECONDS | --count MESSAGES]
  bench  [--corpus FILE | --seed N] [--seconds S] [--smoke] [--bursts-only] [--only TEXT]
         [--scaling [--readers LIST] [--workers LIST] [--senders LIST]] [--whippet PATH]
  sink   --target udp:HOST:PORT|unix:PATH   (drains with recvmmsg, prints counts on SIGTERM)
  replay --capture FILE --target udp:HOST:PORT|unix:PATH|stream:PATH [--speed X | --speed max]
         (sends a whippet capture again: at its recorded pace, X times faster, or all out)

Without --corpus, the workload is generated with the statistics of Datadog's dsd_base corpus.
Every run reports what it did; see man whippet-blast(1) and docs/performance.md.";

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optopt(
        "",
        "target",
        "Where to send (send) or listen (sink)",
        "TARGET",
    );
    o.optopt(
        "",
        "corpus",
        "Newline-separated messages to replay instead of the generated workload",
        "FILE",
    );
    o.optopt(
        "",
        "contexts",
        "Generated workload: distinct contexts. Default 3000 (dsd_base's)",
        "N",
    );
    o.optopt(
        "",
        "tags-per-message",
        "Generated workload: tags per message. Default: 2 to 50 (dsd_base's)",
        "N",
    );
    o.optopt(
        "",
        "messages",
        "Generated workload: messages generated, replayed in a loop. Default 7782 (dsd_base's)",
        "N",
    );
    o.optopt(
        "",
        "seed",
        "Generated workload: the seed; one seed always gives the same messages. Default 7",
        "N",
    );
    o.optopt(
        "",
        "packet-size",
        "Largest packet: 1432 for UDP, 8192 for Unix sockets by default",
        "BYTES",
    );
    o.optopt(
        "",
        "rate",
        "Messages per second. Default: as fast as possible",
        "MSG/S",
    );
    o.optopt(
        "",
        "duration",
        "Seconds to send. Default 10 unless --count",
        "SECONDS",
    );
    o.optopt("", "count", "Messages to send", "N");
    o.optopt(
        "",
        "seconds",
        "bench: seconds per scenario. Default 10 (1 with --smoke)",
        "S",
    );
    o.optflag(
        "",
        "smoke",
        "bench: a short run of every scenario (for CI: no timing is asserted)",
    );
    o.optflag(
        "",
        "scaling",
        "bench: the scaling table instead of the scenarios: UDP as fast as possible over readers, workers and senders, each doubling up to the machine's cores (workers to twice that)",
    );
    o.optopt(
        "",
        "readers",
        "bench --scaling: the readers (--udp-readers) to run, such as 1,4,16. Default: doubling up to the cores",
        "LIST",
    );
    o.optopt(
        "",
        "workers",
        "bench --scaling: the workers (--workers) to run. Default: doubling up to twice the cores",
        "LIST",
    );
    o.optopt(
        "",
        "senders",
        "bench --scaling: the senders to run. Default: doubling up to the cores",
        "LIST",
    );
    o.optflag(
        "",
        "bursts-only",
        "bench: only the non-blocking burst scenario and its floor, rows without the table's head (how bench runs itself at another queue length)",
    );
    o.optopt(
        "",
        "only",
        "bench: only the scenarios whose names contain TEXT, each with its floor",
        "TEXT",
    );
    o.optopt(
        "",
        "whippet",
        "bench: the whippet binary. Default: next to whippet-blast",
        "PATH",
    );
    o.optopt(
        "",
        "capture",
        "replay: a capture file written by whippet (SIGUSR2)",
        "FILE",
    );
    o.optopt(
        "",
        "speed",
        "replay: how many times faster than recorded, or max. Default 1",
        "X",
    );
    o.optflag("h", "help", "Print this help and exit");
    o
}

fn number<T: std::str::FromStr>(m: &getopts::Matches, name: &str) -> Result<Option<T>, String> {
    m.opt_str(name)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| format!("--{name}: '{v}' is not a number"))
        })
        .transpose()
}

fn messages(m: &getopts::Matches) -> Result<Vec<Vec<u8>>, String> {
    if let Some(path) = m.opt_str("corpus") {
        return blast::corpus(std::path::Path::new(&path));
    }
    let mut g = Generated::dsd_base();
    if let Some(v) = number(m, "contexts")? {
        g.contexts = v;
    }
    if let Some(v) = number(m, "tags-per-message")? {
        g.tags_per_message = (v, v);
    }
    if let Some(v) = number(m, "messages")? {
        g.messages = v;
    }
    if let Some(v) = number(m, "seed")? {
        g.seed = v;
    }
    Ok(g.generate())
}

fn cmd_send(m: &getopts::Matches) -> Result<(), String> {
    let target = Target::parse(&m.opt_str("target").ok_or("send needs --target")?)?;
    let size = number(m, "packet-size")?.unwrap_or(target.default_packet_size());
    let packets = blast::pack(&messages(m)?, size);
    let count: Option<u64> = number(m, "count")?;
    let duration =
        number::<f64>(m, "duration")?.or(if count.is_none() { Some(10.0) } else { None });
    let plan = Plan {
        rate: number(m, "rate")?,
        duration: duration.map(Duration::from_secs_f64),
        count,
        bursts: None,
    };
    let sent = blast::send(&target, &packets, plan)?;
    println!(
        "sent {} messages, {} packets, {} bytes in {:.2} s: {:.0} messages/s, {:.0} packets/s, {:.1} MB/s; {} send errors",
        sent.messages,
        sent.packets,
        sent.bytes,
        sent.elapsed.as_secs_f64(),
        sent.per_second(sent.messages),
        sent.per_second(sent.packets),
        sent.per_second(sent.bytes) / 1e6,
        sent.errors
    );
    Ok(())
}

fn cmd_replay(m: &getopts::Matches) -> Result<(), String> {
    let target = Target::parse(&m.opt_str("target").ok_or("replay needs --target")?)?;
    let path = m.opt_str("capture").ok_or("replay needs --capture")?;
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let records =
        whippet::listener::capture::records(&bytes).map_err(|e| format!("{path}: {e}"))?;
    let speed = match m.opt_str("speed").as_deref() {
        None => Some(1.0),
        Some("max") => None,
        Some(v) => match v.parse::<f64>() {
            Ok(x) if x > 0.0 && x.is_finite() => Some(x),
            _ => return Err(format!("--speed: '{v}' is not a positive number or max")),
        },
    };
    let sent = blast::replay(&records, &target, speed)?;
    println!(
        "replayed {} packets ({} messages, {} bytes) of {} in {:.2} s; {} send errors",
        sent.packets,
        sent.messages,
        sent.bytes,
        records.len(),
        sent.elapsed.as_secs_f64(),
        sent.errors
    );
    Ok(())
}

fn cmd_sink(m: &getopts::Matches) -> Result<(), String> {
    let target = Target::parse(&m.opt_str("target").ok_or("sink needs --target")?)?;
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (fd, shown): (std::os::fd::OwnedFd, String) = match &target {
        Target::Udp(addr) => {
            let s =
                std::net::UdpSocket::bind(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?;
            let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
            let shown = format!("udp:{}", s.local_addr().map_err(|e| e.to_string())?);
            (s.into(), shown)
        }
        Target::Unix(path) | Target::Stream(path) => {
            let _ = std::fs::remove_file(path);
            let s = std::os::unix::net::UnixDatagram::bind(path)
                .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
            let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
            (s.into(), format!("unix:{}", path.display()))
        }
    };
    let fd = Arc::new(fd);
    let (reader_fd, reader_stop) = (fd.clone(), stop.clone());
    let reader = std::thread::spawn(move || blast::drain(reader_fd.as_fd(), &reader_stop));
    println!("sink: listening on {shown}");
    signals.forever().next();
    stop.store(true, Relaxed);
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&*fd),
        nix::sys::socket::Shutdown::Read,
    );
    let (packets, messages) = reader.join().map_err(|_| "the reader failed")?;
    println!("sink: packets {packets}");
    println!("sink: messages {messages}");
    if let Target::Unix(path) = &target {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn cmd_bench(m: &getopts::Matches) -> Result<(), String> {
    let smoke = m.opt_present("smoke");
    let corpus = messages(m)?;
    let source = match m.opt_str("corpus") {
        Some(path) => path,
        None => format!(
            "a workload generated with dsd_base's statistics (seed {})",
            number::<u64>(m, "seed")?.unwrap_or(Generated::dsd_base().seed)
        ),
    };
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let whippet = m
        .opt_str("whippet")
        .map(PathBuf::from)
        .unwrap_or_else(|| me.with_file_name("whippet"));
    let seconds = number::<f64>(m, "seconds")?.unwrap_or(if smoke { 1.0 } else { 10.0 });
    let axis = |name: &str| {
        m.opt_str(name)
            .map(|v| bench::parse_axis(&v).map_err(|e| format!("--{name}: {e}")))
            .transpose()
    };
    let axes = bench::Axes {
        readers: axis("readers")?,
        workers: axis("workers")?,
        senders: axis("senders")?,
    };
    let scaling = m.opt_present("scaling");
    if !scaling && axes != bench::Axes::default() {
        return Err(
            "--readers, --workers and --senders choose the rows of --scaling; add it".into(),
        );
    }
    let opts = bench::BenchOptions {
        whippet,
        blast: me,
        corpus,
        seconds,
        smoke,
        bursts_only: m.opt_present("bursts-only"),
        scaling,
        axes,
        only: m.opt_str("only"),
    };
    if opts.scaling {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let [r, w, s] = opts.axes.values(cores);
        println!(
            "whippet-blast bench --scaling: {seconds} s per row, {cores} cores; readers {}, workers {}, senders {}: {} rows",
            list(&r),
            list(&w),
            list(&s),
            r.len() * w.len() * s.len()
        );
        bench::run_scaling(&opts)?;
        return Ok(());
    }
    if opts.bursts_only {
        let rows = bench::run(&opts)?;
        return match rows
            .iter()
            .find(|r| !r.accounted() && !r.scenario.ends_with("(floor)"))
        {
            Some(r) => Err(format!("messages unaccounted for in: {}", r.scenario)),
            None => Ok(()),
        };
    }
    println!(
        "whippet-blast bench: {} messages from {source}, {seconds} s per scenario, {} cores",
        opts.corpus.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let rows = bench::run(&opts)?;
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.scenario.ends_with("(floor)") && !r.accounted())
        .map(|r| r.scenario.as_str())
        .collect();
    if !bad.is_empty() {
        return Err(format!("messages unaccounted for in: {}", bad.join(", ")));
    }
    println!(
        "zero loss: every message sent was parsed, rejected, or dropped under a named counter"
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The subcommand comes first; `whippet-blast --help` has none.
    let rest = match args.first().map(String::as_str) {
        Some("send" | "bench" | "sink" | "replay") => &args[1..],
        _ => &args[..],
    };
    let m = match options().parse(rest) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("whippet-blast: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let result = match args.first().map(String::as_str) {
        _ if m.opt_present("help") => {
            println!("{USAGE}\n\n{}", options().usage("").trim_start());
            return;
        }
        Some("send") => cmd_send(&m),
        Some("bench") => cmd_bench(&m),
        Some("sink") => cmd_sink(&m),
        Some("replay") => cmd_replay(&m),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("whippet-blast: {e}");
        std::process::exit(1);
    }
}
