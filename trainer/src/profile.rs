//! Where a training step's time goes, kernel by kernel (`difinfo-train bench --profile`).
//!
//! A *region* is a named stretch of wall time on the thread that started the profile (the
//! thread that drives the step: rayon's workers run the parallel parts inside it). Regions
//! nest; each records its *exclusive* time, its own minus that of the regions inside it, so
//! the regions of a step add up to the time they cover and [`Profile::other`] is the rest
//! (candle's graph, allocation, everything no region names). A matrix product is recorded
//! under its caller's name (`gemm · decoder layer forward`) with its FLOPs `2·m·n·k`, so the
//! table gives each product family's GFLOP/s beside the element-wise kernels' share.
//!
//! Off (the default) a region costs one relaxed atomic load. Regions entered on other threads
//! (inside a parallel loop) are not recorded: their time is inside their caller's region.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<String, Stat>> = Mutex::new(BTreeMap::new());

thread_local! {
    static OWNER: Cell<bool> = const { Cell::new(false) };
    static STACK: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

/// One region's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Stat {
    /// Times entered.
    pub calls: u64,
    /// Exclusive wall seconds (nested regions' time taken out).
    pub seconds: f64,
    /// FLOPs of the matrix products it ran (0 for element-wise kernels).
    pub flops: f64,
}

struct Frame {
    key: String,
    start: Instant,
    children: f64,
}

/// A running region; recorded when dropped.
#[must_use = "a region measures until it is dropped"]
pub struct Region {
    flops: f64,
}

/// Enters region `name` when a profile runs on this thread.
pub fn region(name: &str) -> Option<Region> {
    enter(name, 0.0, false)
}

/// Enters a matrix product of `2·m·n·k` FLOPs, named after the region that calls it.
pub fn gemm(m: usize, n: usize, k: usize) -> Option<Region> {
    enter("gemm", 2.0 * (m * n * k) as f64, true)
}

fn enter(name: &str, flops: f64, under_caller: bool) -> Option<Region> {
    if !ON.load(Ordering::Relaxed) || !OWNER.with(Cell::get) {
        return None;
    }
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        let key = match (under_caller, s.last()) {
            (true, Some(parent)) => format!("{name} · {}", parent.key),
            _ => name.to_string(),
        };
        s.push(Frame {
            key,
            start: Instant::now(),
            children: 0.0,
        });
    });
    Some(Region { flops })
}

impl Drop for Region {
    fn drop(&mut self) {
        let Some(f) = STACK.with(|s| s.borrow_mut().pop()) else {
            return;
        };
        let total = f.start.elapsed().as_secs_f64();
        STACK.with(|s| {
            if let Some(parent) = s.borrow_mut().last_mut() {
                parent.children += total;
            }
        });
        if let Ok(mut t) = TABLE.lock() {
            let e = t.entry(f.key).or_default();
            e.calls += 1;
            e.seconds += (total - f.children).max(0.0);
            e.flops += self.flops;
        }
    }
}

/// A profile's table: each region's totals, by name.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Profile {
    /// Region name → totals.
    pub regions: BTreeMap<String, Stat>,
}

impl Profile {
    /// The seconds of `total` no region covers.
    pub fn other(&self, total: f64) -> f64 {
        (total - self.regions.values().map(|s| s.seconds).sum::<f64>()).max(0.0)
    }
}

/// Starts (or restarts, emptied) a profile recorded on the calling thread.
pub fn start() {
    if let Ok(mut t) = TABLE.lock() {
        t.clear();
    }
    STACK.with(|s| s.borrow_mut().clear());
    OWNER.with(|o| o.set(true));
    ON.store(true, Ordering::Relaxed);
}

/// Stops the profile and returns its table.
pub fn stop() -> Profile {
    ON.store(false, Ordering::Relaxed);
    OWNER.with(|o| o.set(false));
    let regions = TABLE.lock().map(|t| t.clone()).unwrap_or_default();
    Profile { regions }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(ms: u64) {
        let t = Instant::now();
        while t.elapsed().as_millis() < u128::from(ms) {}
    }

    #[test]
    fn regions_nest_exclusively_and_only_on_the_owner_thread() {
        start();
        let t0 = Instant::now();
        {
            let _outer = region("outer");
            spin(20);
            {
                let _g = gemm(10, 20, 30);
                spin(30);
            }
            std::thread::spawn(|| {
                let _r = region("elsewhere");
                spin(5);
            })
            .join()
            .unwrap();
        }
        let inclusive = t0.elapsed().as_secs_f64();
        let p = stop();
        assert!(region("after").is_none());
        let outer = p.regions["outer"];
        let g = p.regions["gemm · outer"];
        assert_eq!((outer.calls, g.calls), (1, 1));
        assert_eq!(g.flops, 12_000.0);
        assert_eq!(outer.flops, 0.0);
        assert!(g.seconds >= 0.03 && outer.seconds >= 0.02, "{p:?}");
        // The outer region's own time excludes the product's: together they are the block's.
        assert!(outer.seconds + g.seconds <= inclusive, "{p:?} {inclusive}");
        assert!(
            outer.seconds + g.seconds > inclusive - 1e-3,
            "{p:?} {inclusive}"
        );
        assert!(!p.regions.contains_key("elsewhere"));
        assert!((p.other(1.0) - (1.0 - outer.seconds - g.seconds)).abs() < 1e-12);
    }
}
