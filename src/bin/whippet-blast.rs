//! `whippet-blast`: not built yet (see the project's open issues).

fn main() {
    eprintln!("whippet-blast: not built yet");
    std::process::exit(2);
}
