//! `sluice-cni`: run by the container runtime with the `CNI_*` variables set and the
//! network configuration on stdin; prints the result (or the error object) on stdout.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map(|_| stdin);
    let outcome = sluice_cni::run(|name| std::env::var(name).ok(), read);
    let mut stdout = std::io::stdout().lock();
    // Nothing is left to tell the runtime if stdout itself fails.
    let _ = stdout.write_all(outcome.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(if outcome.success { 0 } else { 1 });
}
