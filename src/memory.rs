//! The allocator's settings for a service that holds many companies: few arenas, and free
//! pages handed back after the start-up peak. Linux with glibc only; elsewhere these do nothing.

/// At most two malloc arenas (glibc gives each busy thread one, up to 8 per core, and the
/// free memory of each stays resident): the threads here mostly wait on sockets, so sharing
/// two costs nothing measurable, and 50,000 companies' allocations are not spread over many.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt changes an allocator setting; called before the service's threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands the heap's free pages back to the kernel (glibc keeps them otherwise): after the
/// start-up recovery pass, whose listings of every company are transient, the service's
/// resident memory is what it keeps, not its peak.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}
