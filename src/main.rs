//! `difinfo`: runs the synthetic experiments (being built).
fn main() {
    eprintln!("difinfo: the synthetic experiments are being built");
    std::process::exit(2);
}
