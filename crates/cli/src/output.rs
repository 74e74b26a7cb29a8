//! How commands print: the `-o` formats, colour (only on a terminal, never with
//! `NO_COLOR`) and the progress indicator of long operations (only on a terminal).

use std::{io::IsTerminal, time::Duration};

use anyhow::Context;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// `-o`: text for people, or one document for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns or prose.
    Table,
    /// The table with more columns where a command has them (`lab get`: node, identity,
    /// IP); the table elsewhere.
    Wide,
    /// One JSON document (`observe`: one per flow, a line each, as Hubble's).
    Json,
    /// The JSON document as YAML.
    Yaml,
}

impl Output {
    /// JSON or YAML: the command prints its document and nothing else on stdout.
    pub fn structured(self) -> bool {
        matches!(self, Self::Json | Self::Yaml)
    }
}

/// Prints `value` as the document `output` asks for (JSON unless YAML is asked for).
pub fn print_doc<T: Serialize>(output: Output, value: &T) -> anyhow::Result<()> {
    match output {
        Output::Yaml => print!("{}", yaml(value)?),
        _ => println!(
            "{}",
            serde_json::to_string_pretty(value).context("encoding JSON")?
        ),
    }
    Ok(())
}

/// One YAML document, ending in a newline.
pub fn yaml<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_saphyr::to_string(value).context("encoding YAML")?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// Whether stdout takes colour: a terminal, and `NO_COLOR` unset or empty (no-color.org).
pub fn colour() -> bool {
    colour_for(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

fn colour_for(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The colours words get.
#[derive(Clone, Copy)]
pub enum Tone {
    Good,
    Bad,
    Warn,
}

/// `text` in `tone`'s colour when [`colour`] says so, else as it is.
pub fn paint(text: &str, tone: Tone) -> String {
    if !colour() {
        return text.to_string();
    }
    let style = match tone {
        Tone::Good => anstyle::AnsiColor::Green.on_default(),
        Tone::Bad => anstyle::AnsiColor::Red.on_default().bold(),
        Tone::Warn => anstyle::AnsiColor::Yellow.on_default(),
    };
    format!("{style}{text}{style:#}")
}

/// A spinner on stderr with `message` and the time it has run, for an operation that can
/// take more than a moment. Hidden unless stdout is a terminal, so scripts and pipes see
/// nothing of it. Finish it with [`ProgressBar::finish_and_clear`] before printing.
pub fn spinner(message: impl Into<String>) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(message.into());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A bar on stderr counting the pods an apply starts, or None unless stdout is a terminal
/// (then the apply starts them all at once, reporting nothing).
pub fn pods_bar(message: impl Into<String>) -> Option<ProgressBar> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg} {bar:30} {pos}/{len} pods ({elapsed})")
    {
        bar.set_style(style);
    }
    bar.set_message(message.into());
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// Runs `f` under a [`spinner`] with `message`, cleared when `f` returns.
pub fn with_spinner<T>(message: impl Into<String>, f: impl FnOnce() -> T) -> T {
    let bar = spinner(message);
    let result = f();
    bar.finish_and_clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_the_json_document() {
        let value = serde_json::json!({"name": "web", "ports": [80, 443], "ready": true});
        let text = yaml(&value).unwrap();
        let back: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_for(true, None));
        assert!(colour_for(true, Some(OsStr::new(""))));
        assert!(!colour_for(true, Some(OsStr::new("1"))));
        assert!(!colour_for(false, None));
        // Test output is captured, never a terminal.
        assert_eq!(paint("DROPPED", Tone::Bad), "DROPPED");
    }
}
