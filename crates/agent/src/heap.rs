//! Handing freed heap memory back to the kernel. glibc's malloc keeps what a thread freed
//! in that thread's arena for reuse; after a whole compile (every Pod's workload, label set
//! and identity at GKE's limits) or the initial lists (pages of whole API objects parsed,
//! then slimmed) that is hundreds of MiB the agent will not need again soon, held as RSS
//! until something in the same arena reuses it.

/// Returns the free pages of every malloc arena to the kernel. Costs a walk of the free
/// lists (milliseconds at GKE's limits): for after a large compile, not every pass.
pub fn release_freed() {
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}
