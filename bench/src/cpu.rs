//! CPU time of another process, for the benchmarks' CPU-per-packet figures.

use anyhow::Context;

/// Total CPU time (user + system) the process `pid` has used, in nanoseconds.
pub fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ, the unit of utime/stime: 100 on every Linux ABI Ferry runs on.
    let hz = 100u64;
    Ok(ticks * 1_000_000_000 / hz)
}

/// CPU time the process `pid`'s live threads have used, in nanoseconds, summed from each
/// thread's `/proc/<pid>/task/<tid>/schedstat` (the scheduler's own nanosecond count). Finer
/// than [`cpu_ns`]'s 10 ms ticks, so a low packet rate still gives a usable CPU per packet;
/// threads that exited are not counted, which suits a forwarder whose threads all run for the
/// whole measurement.
pub fn task_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ran = stat.split_whitespace().next().context("empty schedstat")?;
        total += ran.parse::<u64>().context("bad schedstat")?;
    }
    Ok(total)
}
