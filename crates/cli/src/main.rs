//! `sluice`: the command line for an agent and the lab (the commands live in the library,
//! so tests and the manual pages see the same clap tree).

fn main() -> std::process::ExitCode {
    sluice_cli::main()
}
