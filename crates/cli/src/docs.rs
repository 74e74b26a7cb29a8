//! Shell completions and manual pages, generated from the clap definitions.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;
use serde::Serialize;

use crate::output::{Output, print_doc};

#[derive(Args)]
pub struct CompletionArgs {
    /// bash, zsh, fish, elvish or powershell. Install e.g. with
    /// `sluice completion bash > /etc/bash_completion.d/sluice`.
    shell: Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Directory to write `sluice.1`, `sluice-lab.1`, `sluice-lab-apply.1`, ... into
    /// (created if missing).
    #[arg(long)]
    dir: PathBuf,
}

/// What `sluice man` wrote.
#[derive(Serialize)]
struct Written {
    files: Vec<PathBuf>,
}

/// Prints the completion script of `shell` for the whole command tree.
pub fn completion(args: &CompletionArgs) {
    let mut command = crate::command();
    clap_complete::generate(args.shell, &mut command, "sluice", &mut std::io::stdout());
}

/// Writes a manual page for `sluice` and for every visible subcommand into `args.dir`.
pub fn man(args: &ManArgs, output: Output) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("mkdir {}", args.dir.display()))?;
    let mut command = crate::command().disable_help_subcommand(true);
    // Building names every subcommand `sluice-lab-apply`, as its page is called.
    command.build();
    let mut files = Vec::new();
    write_pages(command, &args.dir, &mut files)?;
    if output.structured() {
        return print_doc(output, &Written { files });
    }
    for file in &files {
        println!("{}", file.display());
    }
    Ok(())
}

fn write_pages(command: clap::Command, dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, files)?;
    }
    let name = command.get_display_name().unwrap_or("sluice").to_string();
    let file = clap_mangen::Man::new(command)
        .generate_to(dir)
        .with_context(|| format!("writing the manual page of {name} into {}", dir.display()))?;
    files.push(file);
    Ok(())
}
