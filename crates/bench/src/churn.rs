//! The agent under connection churn, second by second: a real `sluice-agent` programs the
//! node, the client opens connections through a ClusterIP at a fixed rate, first for a
//! warm-up that fills the conntrack table as a full benchmark run's earlier phases leave
//! it, then for the measured time, over which the agent's CPU time and RSS are sampled
//! every second (so a periodic cost and a growing RSS show), with the conntrack fill at
//! both ends. `sluice-bench --agent-churn 60 --churn-warmup 10`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use sluice_common::MapId;
use sluice_datapath::PinnedMaps;

use crate::{
    BenchError,
    agent::{cpu_seconds, rss_kib, start},
    kproxy::ServiceSpec,
    load::{self, Rate},
};

/// One second of the measured time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    /// Share of one core over the window.
    pub cpu_fraction: f64,
    pub rss_kib: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ChurnCost {
    pub target_rate: f64,
    pub warmup: Rate,
    pub achieved: Rate,
    /// Share of one core over the whole measured time.
    pub cpu_fraction: f64,
    pub windows: Vec<Window>,
    /// Conntrack entries and capacity when the measured time began and ended.
    pub ct_before: u64,
    pub ct_after: u64,
    pub ct_capacity: u32,
    pub agent_pid: u32,
    pub seconds: f64,
}

/// Starts the agent with `services` (the measured one last), churns for `warmup`, then
/// measures `duration` of churn at `target_rate`. `announce` hears the agent's pid when
/// the measured time begins (to attach a profiler to it).
pub fn measure(
    services: &[ServiceSpec],
    target_rate: f64,
    warmup: Duration,
    duration: Duration,
    announce: &mut dyn FnMut(&str),
) -> Result<ChurnCost, BenchError> {
    let measured = services
        .last()
        .ok_or_else(|| BenchError::Failed("no service to measure".into()))?;
    let to = crate::vip_addr(measured);
    let running = start(services)?;
    let pid = running.agent.0.id();
    thread::sleep(Duration::from_millis(500));
    let warmed = if warmup.is_zero() {
        Rate::default()
    } else {
        load::connect_request_close(&running.topo.client, to, warmup, Some(target_rate))?
    };
    let maps = PinnedMaps::open(running.pins.path())
        .map_err(|e| BenchError::Failed(format!("open the agent's maps: {e}")))?;
    let count = || {
        maps.inventory
            .entries(MapId::Conntrack)
            .map_err(|e| BenchError::Failed(format!("counting ct4: {e}")))
    };
    let ct_before = count()?;
    announce(&format!(
        "agent pid {pid}: {ct_before} conntrack entries; measuring {} s",
        duration.as_secs_f64()
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = thread::spawn({
        let stop = Arc::clone(&stop);
        move || -> Result<Vec<Window>, BenchError> {
            let mut windows = Vec::new();
            let mut last = (Instant::now(), cpu_seconds(pid)?);
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_secs(1));
                let now = (Instant::now(), cpu_seconds(pid)?);
                windows.push(Window {
                    cpu_fraction: (now.1 - last.1) / (now.0 - last.0).as_secs_f64(),
                    rss_kib: rss_kib(pid)?,
                });
                last = now;
            }
            Ok(windows)
        }
    });
    let cpu_before = cpu_seconds(pid)?;
    let t = Instant::now();
    let achieved =
        load::connect_request_close(&running.topo.client, to, duration, Some(target_rate));
    let seconds = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_before;
    stop.store(true, Ordering::Relaxed);
    let windows = sampler
        .join()
        .map_err(|_| BenchError::Failed("the sampler panicked".into()))??;
    let ct_after = count()?;
    Ok(ChurnCost {
        target_rate,
        warmup: warmed,
        achieved: achieved?,
        cpu_fraction: cpu / seconds,
        windows,
        ct_before,
        ct_after,
        ct_capacity: maps.inventory.capacity(MapId::Conntrack),
        agent_pid: pid,
        seconds,
    })
}

/// The measurement as a few lines of text: the totals, then one line per second.
pub fn render(cost: &ChurnCost) -> String {
    let mut out = format!(
        "agent at {:.0} conn/s (achieved {:.0}/s after a warm-up at {:.0}/s): {:.2}% of a core \
         over {:.1} s; conntrack {} -> {} of {}\n",
        cost.target_rate,
        cost.achieved.per_sec,
        cost.warmup.per_sec,
        cost.cpu_fraction * 100.0,
        cost.seconds,
        cost.ct_before,
        cost.ct_after,
        cost.ct_capacity,
    );
    out.push_str("second  cpu%   rss_kib\n");
    for (i, w) in cost.windows.iter().enumerate() {
        out.push_str(&format!(
            "{:>6}  {:>5.2}  {:>7}\n",
            i + 1,
            w.cpu_fraction * 100.0,
            w.rss_kib
        ));
    }
    out
}
