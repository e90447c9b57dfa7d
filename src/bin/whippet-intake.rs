//! `whippet-intake`: not built yet (see the project's open issues).

fn main() {
    eprintln!("whippet-intake: not built yet");
    std::process::exit(2);
}
