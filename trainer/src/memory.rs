//! The machine's memory as the one ceiling of every size check: a computation that would need
//! more than the physical memory is refused before anything of that size is allocated
//! ([`check_memory`]), with the bytes it needs in the message.

use crate::error::{Error, Result};

/// Bytes of physical memory (`MemTotal` of `/proc/meminfo` on Linux), the ceiling of the size
/// checks on the CPU ([`crate::model::Model::check_forward_size`], the KV cache's growth); `None` where unknown
/// (no ceiling then).
pub fn physical_memory() -> Option<u128> {
    static MEM: std::sync::OnceLock<Option<u128>> = std::sync::OnceLock::new();
    *MEM.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Refuses `what`, which needs at least `bytes` of memory (made of `detail`), when that is more
/// than the machine's [`physical_memory`]: the one comparison behind the size checks of host
/// allocations (a generation's batch, a benchmark's inputs), made before anything of that size
/// is allocated. `Ok` where the memory is unknown.
///
/// # Errors
/// [`Error::TooLarge`].
pub fn check_memory(
    what: impl FnOnce() -> String,
    bytes: u128,
    detail: impl FnOnce() -> String,
) -> Result<()> {
    match physical_memory() {
        Some(limit) if bytes > limit => Err(Error::TooLarge {
            what: what(),
            bytes,
            detail: detail(),
            limit,
        }),
        _ => Ok(()),
    }
}
