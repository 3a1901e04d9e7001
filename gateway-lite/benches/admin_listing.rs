//! What the admin sessions listing (`GET /admin/v1/sessions`) costs the gateway, with printed
//! figures: the listing's own time as live sessions grow, and the latency of the public create
//! path (`create_session` on the embedded state) while an admin lists in a loop, against the
//! same creates with no listing, in interleaved rounds of the same run.
//!
//! `cargo bench -p ferry-gateway --bench admin_listing` (500,000 live sessions);
//! with `--test` (as CI runs benches) a small run that checks it works.

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_core::time::UnixTime;
use ferry_gateway::state::{JoinCodeHash, MemoryState, SessionRecord, State};
use hdrhistogram::Histogram;

const T0: u64 = 1_800_000_000;

fn record(id: u64) -> SessionRecord {
    SessionRecord {
        session_id: id,
        realm: "bench".into(),
        relay_id: 1,
        created_by: "bench-key".into(),
        created_at: T0 + id / 1000,
        join_expires_at: T0 + 3600,
        expires_at: T0 + 7200,
        creator_public_key: None,
        expected_joiner_public_key: None,
        joined_by: None,
    }
}

/// Latencies from 1 ns to 100 s, three significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram")
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Fills `state` up to `n` live sessions, ids from `next`.
fn fill(state: &MemoryState, next: &AtomicU64, n: u64) {
    block_on(async {
        while next.load(Ordering::Relaxed) < n {
            let id = next.fetch_add(1, Ordering::Relaxed);
            state
                .create_session(&record(id), JoinCodeHash::of(&id.to_string()), UnixTime(T0))
                .await
                .expect("create");
        }
    });
}

/// The median time of `rounds` listings of `limit` sessions.
fn listing_time(state: &MemoryState, limit: usize, rounds: usize) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            let listed = block_on(state.sessions(UnixTime(T0 + 10), limit)).expect("list");
            black_box(listed);
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[times.len() / 2]
}

/// Create latencies (ns) of `creates` new sessions, with or without a thread listing `limit`
/// sessions in a loop meanwhile.
fn create_latencies(
    state: &Arc<MemoryState>,
    next: &Arc<AtomicU64>,
    creates: u64,
    lister: Option<usize>,
) -> Histogram<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let lists = Arc::new(AtomicU64::new(0));
    let listing = lister.map(|limit| {
        let (state, stop, lists) = (state.clone(), stop.clone(), lists.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(block_on(state.sessions(UnixTime(T0 + 10), limit)).expect("list"));
                lists.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    // The creates are timed once the lister is under way.
    while listing.is_some() && lists.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    let mut histogram = latency_histogram();
    block_on(async {
        for _ in 0..creates {
            let id = next.fetch_add(1, Ordering::Relaxed);
            let code = JoinCodeHash::of(&id.to_string());
            let start = Instant::now();
            state
                .create_session(&record(id), code, UnixTime(T0))
                .await
                .expect("create");
            histogram.saturating_record((start.elapsed().as_nanos() as u64).max(1));
        }
    });
    stop.store(true, Ordering::Relaxed);
    if let Some(listing) = listing {
        listing.join().expect("lister");
    }
    histogram
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let (small, large, creates, rounds) = if quick {
        (1_000, 20_000, 2_000, 3)
    } else {
        (1_000, 500_000, 50_000, 5)
    };
    let state = Arc::new(MemoryState::new(large as usize + 10 * creates as usize));
    let next = Arc::new(AtomicU64::new(0));

    fill(&state, &next, small);
    let small_100 = listing_time(&state, 100, 21);
    let small_10k = listing_time(&state, 10_000, 21);
    fill(&state, &next, large);
    let large_100 = listing_time(&state, 100, 21);
    let large_10k = listing_time(&state, 10_000, 21);
    println!(
        "listing the newest 100: {small_100:?} with {small} live sessions, {large_100:?} with \
         {large} ({:.2}x)",
        large_100.as_secs_f64() / small_100.as_secs_f64()
    );
    println!(
        "listing the newest 10000: {small_10k:?} with {small} live sessions, {large_10k:?} \
         with {large} ({:.2}x)",
        large_10k.as_secs_f64() / small_10k.as_secs_f64()
    );

    // Interleaved rounds: creates alone, then creates while an admin lists 10,000 in a loop.
    let mut alone = latency_histogram();
    let mut listed = latency_histogram();
    for _ in 0..rounds {
        alone
            .add(create_latencies(
                &state,
                &next,
                creates / rounds as u64,
                None,
            ))
            .expect("merge");
        listed
            .add(create_latencies(
                &state,
                &next,
                creates / rounds as u64,
                Some(10_000),
            ))
            .expect("merge");
    }
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "create_session with {large}+ live sessions: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs \
         alone; p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs while an admin lists 10000 in a loop \
         (p99 {:.2}x)",
        us(&alone, 0.5),
        us(&alone, 0.99),
        alone.max() as f64 / 1000.0,
        us(&listed, 0.5),
        us(&listed, 0.99),
        listed.max() as f64 / 1000.0,
        us(&listed, 0.99) / us(&alone, 0.99).max(0.001)
    );
}
