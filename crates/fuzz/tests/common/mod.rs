//! What every campaign shares: the seed and input count from the environment, a tally of
//! outcomes, and the loop that runs inputs, catches panics and reports.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    panic::{AssertUnwindSafe, catch_unwind},
    time::Instant,
};

const DEFAULT_SEED: u64 = 0x5eed_f022;

/// `SLUICE_FUZZ_SEED` (hex), or the fixed default.
pub fn seed_from_env() -> u64 {
    std::env::var("SLUICE_FUZZ_SEED").map_or(DEFAULT_SEED, |s| {
        let s = s.trim_start_matches("0x");
        u64::from_str_radix(s, 16).unwrap_or_else(|e| panic!("SLUICE_FUZZ_SEED {s:?}: {e}"))
    })
}

/// `SLUICE_FUZZ_INPUTS`, or a million.
pub fn inputs_from_env() -> u64 {
    std::env::var("SLUICE_FUZZ_INPUTS").map_or(1_000_000, |n| {
        n.parse()
            .unwrap_or_else(|e| panic!("SLUICE_FUZZ_INPUTS {n:?}: {e}"))
    })
}

/// Outcomes by name.
#[derive(Default)]
pub struct Tally(BTreeMap<&'static str, u64>);

impl Tally {
    pub fn count(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }
}

/// A finished run: its figures and the inputs that broke a property.
pub struct Campaign {
    name: &'static str,
    seed: u64,
    inputs: u64,
    seconds: f64,
    tally: Tally,
    failures: Vec<String>,
}

impl Campaign {
    /// Runs `one` `inputs` times; it returns a description of a broken property. A panic
    /// is a failure too, reported with the input number (the seed replays it).
    pub fn run(
        name: &'static str,
        seed: u64,
        inputs: u64,
        mut one: impl FnMut(&mut Tally) -> Option<String>,
    ) -> Self {
        let mut tally = Tally::default();
        let mut failures = Vec::new();
        let start = Instant::now();
        for i in 0..inputs {
            match catch_unwind(AssertUnwindSafe(|| one(&mut tally))) {
                Ok(None) => {}
                Ok(Some(failure)) => failures.push(format!("input {i}: {failure}")),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("input {i}: PANIC {message}"));
                }
            }
        }
        Self {
            name,
            seed,
            inputs,
            seconds: start.elapsed().as_secs_f64(),
            tally,
            failures,
        }
    }

    /// Prints the figures and fails the test on any failure.
    pub fn finish(self) {
        println!(
            "{} fuzz: seed {:#x}, {} inputs in {:.1} s ({:.0}/s)",
            self.name,
            self.seed,
            self.inputs,
            self.seconds,
            self.inputs as f64 / self.seconds.max(1e-9)
        );
        for (what, n) in &self.tally.0 {
            println!("  {what:45} {n}");
        }
        println!("  failures: {}", self.failures.len());
        for failure in self.failures.iter().take(10) {
            println!("  FAILURE {failure}");
        }
        assert!(
            self.failures.is_empty(),
            "{} of {} inputs broke a property (seed {:#x}); first: {}",
            self.failures.len(),
            self.inputs,
            self.seed,
            self.failures[0]
        );
    }
}

/// Nine lines of YAML that expand to 9^9 strings through aliases ("billion laughs").
pub fn alias_bomb() -> String {
    let mut text = format!("a: &a [{}]\n", ["\"lol\""; 9].join(","));
    let mut previous = 'a';
    for name in 'b'..='i' {
        let refs = vec![format!("*{previous}"); 9].join(",");
        text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        previous = name;
    }
    text
}
